//! Arbitrary bytes as the main config file, loaded the way `portgate check`
//! and a SIGHUP reload load it (`portgate::config::load`: includes, validation,
//! the log-level check). It must never panic; every problem must display;
//! a config it accepts must render with `to_toml` to a file that loads back
//! to the same config and hash.
//!
//! Each fuzzing process works in its own directory (under `$PORTGATE_FUZZ_DIR`,
//! else /dev/shm when there is one, else the temp dir), rewriting one file per input (`main/portgate.toml`). Beside it is what
//! the seed configs include: `conf.d/db.toml` (a valid included route) and
//! `inc/listen.toml` (an included file with a key it may not have).
#![no_main]

use std::path::{Component, Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portgate::config::render::to_toml;

struct Dir {
    main: PathBuf,
    rendered: PathBuf,
}

fn dir() -> &'static Dir {
    static DIR: OnceLock<Dir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let base = match std::env::var_os("PORTGATE_FUZZ_DIR") {
            Some(dir) => PathBuf::from(dir),
            None if shm.is_dir() => shm.to_path_buf(),
            None => std::env::temp_dir(),
        };
        let root = base.join(format!("portgate-fuzz-config-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        // Includes cannot leave `main/` (see `includes_escape`), so they never
        // see the rendered file of an earlier input.
        let main = root.join("main");
        std::fs::create_dir_all(main.join("conf.d")).unwrap();
        std::fs::create_dir_all(main.join("inc")).unwrap();
        std::fs::create_dir_all(root.join("render")).unwrap();
        std::fs::write(
            main.join("conf.d/db.toml"),
            "[[route]]\nname = \"tenant-a-db\"\nport = 8032\ntarget = \"db1.tenant-a.internal:5432\"\ntenant = \"tenant-a\"\n",
        )
        .unwrap();
        std::fs::write(main.join("inc/listen.toml"), "[listen]\nports = \"1-2\"\n").unwrap();
        Dir { main: main.join("portgate.toml"), rendered: root.join("render/portgate.toml") }
    })
}

/// Includes that could leave the fuzzing directory (absolute paths, `..`):
/// the loader would read whatever they name (`/dev/zero`, a FIFO, the whole
/// file system with `/**/*`), which tests the machine, not the loader.
fn includes_escape(text: &str) -> bool {
    let Ok(table) = toml::from_str::<toml::Table>(text) else { return false };
    let Some(include) = table.get("include") else { return false };
    let Some(items) = include.as_array() else { return false };
    items.iter().filter_map(|v| v.as_str()).any(|p| {
        let path = Path::new(p);
        p.contains("..") || path.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    })
}

fuzz_target!(|data: &[u8]| {
    let d = dir();
    if let Ok(text) = std::str::from_utf8(data) {
        if includes_escape(text) {
            return;
        }
    }
    std::fs::write(&d.main, data).unwrap();
    match portgate::config::load(&d.main) {
        Err(e) => {
            assert!(!e.problems.is_empty(), "an error without a problem");
            let _ = e.to_string();
        }
        Ok(cfg) => {
            let hash = cfg.hash();
            let _ = cfg.listen_ports();
            let _ = cfg.tenants();
            let text = to_toml(&cfg);
            std::fs::write(&d.rendered, &text).unwrap();
            let mut back = portgate::config::load(&d.rendered)
                .unwrap_or_else(|e| panic!("rendered config does not load:\n{e}\n---\n{text}"));
            back.source = cfg.source.clone();
            assert_eq!(back, cfg, "rendered config loads differently:\n{text}");
            assert_eq!(back.hash(), hash);
        }
    }
});
