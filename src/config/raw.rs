//! Serde mirror of the TOML file, with spans, and reading of `include` files.
//!
//! Values that validation may reject are kept as spanned strings or integers
//! (not parsed into durations, CIDRs or ports here), so that a bad value is a
//! located problem among others instead of a serde error that stops the whole
//! parse. Unknown keys are rejected by serde (`deny_unknown_fields`): TOML
//! syntax and unknown keys are the only problems reported one at a time.
//!
//! This module owns the file reading (which files are read, how big, in
//! what order) and the `FILE:LINE:COL` of a span. It must not judge values
//! or fill in defaults: that is [`validate`](super::validate)'s job.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::{ConfigError, Problem};

/// Largest config or include file read: far above any real route table (10,000
/// routes take about 1 MiB),
/// small enough that a wrong path (a log, a device) is refused, not read.
const MAX_FILE_BYTES: u64 = 16 << 20;

/// A spanned optional list of spanned strings (`allow`, `endpoints`, ...).
pub type SpannedList = Spanned<Vec<Spanned<String>>>;

/// The main file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Globs or paths of files with more `[[route]]` and `[[test]]` tables, relative to this file.
    #[serde(default)]
    pub include: Vec<Spanned<String>>,
    #[serde(default)]
    pub listen: RawListen,
    #[serde(default)]
    pub proxy_protocol: RawProxyProtocol,
    #[serde(default)]
    pub keepalive: RawKeepalive,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub admin: RawAdmin,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub access: RawAccess,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub route: Vec<Spanned<RawRoute>>,
    /// Policy tests; moved into [`Tree::tests`] with the included ones.
    #[serde(default)]
    pub test: Vec<Spanned<RawTest>>,
}

/// `[listen]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    /// IP literal to listen on.
    pub address: Option<Spanned<String>>,
    /// `"8000-8049"`, `"8022"` or `8022`.
    pub ports: Option<Spanned<PortsValue>>,
}

/// `listen.ports` as written.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PortsValue {
    Text(String),
    Number(i64),
}

/// `[proxy_protocol]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxyProtocol {
    /// `"off"` or `"required"`.
    pub mode: Option<Spanned<String>>,
    /// CIDRs of peers allowed to send a header.
    pub trusted: Option<SpannedList>,
    pub header_timeout: Option<Spanned<String>>,
}

/// `[keepalive]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeepalive {
    pub time: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub idle_timeout_limit: Option<Spanned<String>>,
}

/// `[timeouts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<Spanned<String>>,
    pub idle: Option<Spanned<String>>,
    pub shutdown_delay: Option<Spanned<String>>,
    pub drain: Option<Spanned<String>>,
    pub revoke_grace: Option<Spanned<String>>,
    /// `"off"` or a duration: the default for routes.
    pub max_session: Option<Spanned<String>>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// `IP:port` or `"off"`.
    pub listen: Option<Spanned<String>>,
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<Spanned<String>>,
    pub level: Option<Spanned<String>>,
    /// Lines the in-memory queue to the log writer holds.
    pub queue_lines: Option<Spanned<i64>>,
    /// `"best_effort"` or `"required"`.
    pub audit: Option<Spanned<String>>,
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// `"route"` or `"node"`.
    pub histograms: Option<Spanned<String>>,
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawControl {
    /// A path (relative to the config file's directory) or `"off"`.
    pub socket: Option<Spanned<String>>,
}

/// `[access]`: defaults for routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAccess {
    pub allow: Option<SpannedList>,
    pub endpoints: Option<SpannedList>,
    pub max_connections: Option<Spanned<i64>>,
    pub max_per_source: Option<Spanned<i64>>,
}

/// `[upstream]`: how targets are dialed.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// Local addresses to dial targets from.
    pub source: Option<SpannedList>,
}

/// One `[[route]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: Option<Spanned<String>>,
    pub port: Option<Spanned<i64>>,
    pub target: Option<Spanned<String>>,
    pub tenant: Option<Spanned<String>>,
    pub via: Option<Spanned<String>>,
    pub allow: Option<SpannedList>,
    pub endpoints: Option<SpannedList>,
    pub max_connections: Option<Spanned<i64>>,
    pub ssh_user: Option<Spanned<String>>,
    /// RFC 3339 times bounding the access window, `[not_before, not_after)`.
    pub not_before: Option<Spanned<String>>,
    pub not_after: Option<Spanned<String>>,
    /// `"off"` or a duration; replaces `[timeouts] max_session`.
    pub max_session: Option<Spanned<String>>,
    /// Replaces `[upstream] source`.
    pub source: Option<SpannedList>,
}

/// One `[[test]]`: a connection and what admission must decide for it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTest {
    pub port: Option<Spanned<i64>>,
    /// An IP address (the admitted client, as from a PROXY header).
    pub client: Option<Spanned<String>>,
    pub endpoint: Option<Spanned<String>>,
    /// RFC 3339: the time the windows are judged at (default: now).
    pub at: Option<Spanned<String>>,
    /// `"admit"` or `"reject"`.
    pub expect: Option<Spanned<String>>,
    pub route: Option<Spanned<String>>,
    pub reason: Option<Spanned<String>>,
}

/// An included file: routes and tests only.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInclude {
    #[serde(default)]
    route: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    test: Vec<Spanned<RawTest>>,
}

/// One file's path (as shown in messages) and text (for line numbers).
#[derive(Debug)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

impl SourceFile {
    /// `FILE:LINE:COL` for a byte offset (1-based line and column, the
    /// column counted in characters).
    pub fn locate(&self, offset: usize) -> String {
        let offset = offset.min(self.text.len());
        let before = self.text.get(..offset).unwrap_or(&self.text);
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let col = before[line_start..].chars().count() + 1;
        format!("{}:{line}:{col}", self.path.display())
    }
}

/// The main file and every included file, parsed but not validated.
#[derive(Debug)]
pub struct Tree {
    /// `files[0]` is the main file.
    pub files: Vec<SourceFile>,
    pub main: RawConfig,
    /// Every route with the index of the file it is in.
    pub routes: Vec<(usize, Spanned<RawRoute>)>,
    /// Every `[[test]]` with the index of the file it is in, main file first.
    pub tests: Vec<(usize, Spanned<RawTest>)>,
    /// Problems found while reading includes (reported with validation's).
    pub problems: Vec<Problem>,
}

impl Tree {
    /// A located problem in file `file` at `span`.
    pub fn problem(&self, file: usize, span: Range<usize>, message: impl Into<String>) -> Problem {
        let location = match self.files.get(file) {
            Some(f) => f.locate(span.start),
            None => String::new(),
        };
        Problem { location, message: message.into() }
    }
}

fn toml_problem(file: &SourceFile, e: &toml::de::Error, hint: &str) -> Problem {
    let location = match e.span() {
        Some(s) => file.locate(s.start),
        None => file.path.display().to_string(),
    };
    let message = e.message().trim().replace('\n', " ");
    Problem { location, message: format!("{message}{hint}") }
}

/// Read one config file, the main file or an include: the one place that
/// decides which files are read. `Err` is why not, for the caller to put in
/// its own message.
fn read_file(path: &Path) -> Result<String, String> {
    // Only regular files: opening a FIFO or a device would block or read
    // forever.
    if let Ok(m) = std::fs::metadata(path) {
        if !m.is_file() {
            return Err("not a regular file".to_string());
        }
        if m.len() > MAX_FILE_BYTES {
            return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
        }
    }
    std::fs::read_to_string(path).map_err(|e| e.to_string())
}

/// Read the main file and its includes. Fails only when the main file cannot
/// be read or parsed; problems with included files are collected in
/// [`Tree::problems`].
pub fn read_tree(path: &Path) -> Result<Tree, ConfigError> {
    let text = read_file(path).map_err(|why| ConfigError {
        problems: vec![Problem {
            location: path.display().to_string(),
            message: format!("cannot read config: {why}"),
        }],
    })?;
    let main_file = SourceFile { path: path.to_path_buf(), text };
    let main: RawConfig = toml::from_str(&main_file.text)
        .map_err(|e| ConfigError { problems: vec![toml_problem(&main_file, &e, "")] })?;
    let mut tree =
        Tree { files: vec![main_file], main, routes: Vec::new(), tests: Vec::new(), problems: Vec::new() };
    let routes = std::mem::take(&mut tree.main.route);
    tree.routes.extend(routes.into_iter().map(|r| (0, r)));
    let tests = std::mem::take(&mut tree.main.test);
    tree.tests.extend(tests.into_iter().map(|t| (0, t)));

    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut seen: Vec<PathBuf> = vec![std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let patterns: Vec<Spanned<String>> = tree.main.include.clone();
    for pattern in patterns {
        let span = pattern.span();
        let joined = base.join(pattern.get_ref());
        let is_glob = pattern.get_ref().contains(['*', '?', '[']);
        let paths: Vec<PathBuf> = if is_glob {
            match glob::glob(&joined.to_string_lossy()) {
                Ok(iter) => {
                    let mut v: Vec<PathBuf> = iter.filter_map(Result::ok).filter(|p| p.is_file()).collect();
                    v.sort();
                    v
                }
                Err(e) => {
                    let p = tree.problem(
                        0,
                        span,
                        format!("invalid include pattern {:?}: {e}", pattern.get_ref()),
                    );
                    tree.problems.push(p);
                    continue;
                }
            }
        } else {
            vec![joined]
        };
        for file_path in paths {
            let canonical = std::fs::canonicalize(&file_path).unwrap_or_else(|_| file_path.clone());
            if seen.contains(&canonical) {
                continue;
            }
            seen.push(canonical);
            let text = match read_file(&file_path) {
                Ok(t) => t,
                Err(why) => {
                    let p = tree.problem(
                        0,
                        span.clone(),
                        format!("cannot read included file {}: {why}", file_path.display()),
                    );
                    tree.problems.push(p);
                    continue;
                }
            };
            let file = SourceFile { path: file_path, text };
            match toml::from_str::<RawInclude>(&file.text) {
                Ok(inc) => {
                    let idx = tree.files.len();
                    tree.routes.extend(inc.route.into_iter().map(|r| (idx, r)));
                    tree.tests.extend(inc.test.into_iter().map(|t| (idx, t)));
                    tree.files.push(file);
                }
                Err(e) => {
                    let hint = if e.message().contains("unknown field") {
                        " (included files may only contain [[route]] and [[test]] tables)"
                    } else {
                        ""
                    };
                    tree.problems.push(toml_problem(&file, &e, hint));
                }
            }
        }
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(e: ConfigError) -> Vec<String> {
        e.problems.iter().map(|p| p.message.clone()).collect()
    }

    #[test]
    fn main_file_and_includes_are_checked_alike() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub.toml")).unwrap();
        // The main file.
        let e = read_tree(&dir.path().join("sub.toml")).unwrap_err();
        assert_eq!(messages(e), ["cannot read config: not a regular file"]);
        // An include, with the same reason.
        let main = dir.path().join("main.toml");
        std::fs::write(&main, "include = [\"sub.toml\", \"missing.toml\"]\n").unwrap();
        let tree = read_tree(&main).unwrap();
        let got: Vec<&str> = tree.problems.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("cannot read included file "), "{got:?}");
        assert!(got[0].ends_with("sub.toml: not a regular file"), "{got:?}");
        assert!(got[1].ends_with("missing.toml: No such file or directory (os error 2)"), "{got:?}");
        assert_eq!(tree.problems[0].location, format!("{}:1:12", main.display()));
    }
}
