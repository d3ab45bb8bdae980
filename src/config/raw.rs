//! Serde mirror of the TOML file (skeleton; filled in by the config work).

use std::path::Path;

use super::ConfigError;

/// The main file and every included file, parsed but not validated.
#[derive(Debug)]
pub struct Tree {}

/// Read the main file and its includes.
pub fn read_tree(_path: &Path) -> Result<Tree, ConfigError> {
    todo!("config loading")
}
