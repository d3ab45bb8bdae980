//! Every fixture config: valid ones load, invalid ones report exactly the
//! problems in their `.expected` file (one line per problem, located).

use std::path::{Path, PathBuf};

fn fixtures(kind: &str) -> (PathBuf, Vec<PathBuf>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(kind);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no fixtures in {}", dir.display());
    (dir, files)
}

#[test]
fn valid_fixtures_load() {
    let (_, files) = fixtures("valid");
    for f in files {
        if let Err(e) = portgate::config::load(&f) {
            panic!("{} should be valid:\n{e}", f.display());
        }
    }
}

#[test]
fn invalid_fixtures_report_the_expected_problems() {
    let (dir, files) = fixtures("invalid");
    let prefix = format!("{}/", dir.display());
    for f in files {
        let expected_path = f.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let got = match portgate::config::load(&f) {
            Ok(_) => panic!("{} should be invalid", f.display()),
            Err(e) => e.problems.iter().map(|p| p.to_string().replace(&prefix, "")).collect::<Vec<_>>(),
        };
        let want: Vec<&str> = expected.lines().collect();
        assert_eq!(got, want, "problems reported for {}", f.display());
    }
}

#[test]
fn full_fixture_has_the_effective_values() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid");
    let cfg = portgate::config::load(&dir.join("full.toml")).unwrap();
    let names: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
    // Sorted by port then via; the included route is there.
    assert_eq!(names, ["tenant-a-web1", "tenant-b-web1", "tenant-a-db"]);
    let db = &cfg.routes[2];
    assert_eq!(db.max_connections, 10, "inherited from [access]");
    assert_eq!(db.endpoints, ["vpce-0a1b2c3d4e5f67890"]);
    assert_eq!(cfg.access.max_per_source, 3);
    assert_eq!(cfg.timeouts.idle, Some(std::time::Duration::from_secs(8 * 3600)));
    assert_eq!(cfg.listen_ports().len(), 50);
}
