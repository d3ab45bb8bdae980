//! Raw tree -> validated [`Config`] (skeleton; filled in by the config work).

use std::path::Path;

use super::raw::Tree;
use super::{Config, ConfigError};

/// Validate the tree, collecting every problem.
pub fn validate(_path: &Path, _tree: &Tree) -> Result<Config, ConfigError> {
    todo!("config validation")
}
