//! Golden files: every file `render` writes for the example topology, byte for byte.
//!
//! After an intended change of a renderer, regenerate and review the diff:
//! `UPDATE_GOLDEN=1 cargo test -p ringmail-deploy --test golden`, then `git diff deploy/tests/golden`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/example.com")
}

fn files_under(dir: &Path, base: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, base, out);
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.insert(rel.to_path_buf());
        }
    }
}

#[test]
fn every_rendered_file_matches_its_golden_copy() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/example.com.toml");
    let t = ringmail_deploy::load_file(&example).unwrap_or_else(|e| panic!("{e}"));
    let files = ringmail_deploy::render(&t);
    let dir = golden_dir();
    if std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1") {
        let _ = std::fs::remove_dir_all(&dir);
        ringmail_deploy::write_tree(&dir, &files).unwrap();
        eprintln!(
            "rewrote {} golden files under {}",
            files.len(),
            dir.display()
        );
        return;
    }
    let mut stale = BTreeSet::new();
    files_under(&dir, &dir, &mut stale);
    let mut problems = Vec::new();
    for f in &files {
        stale.remove(&f.path);
        match std::fs::read_to_string(dir.join(&f.path)) {
            Err(_) => problems.push(format!("{}: no golden copy", f.path.display())),
            Ok(g) if g != f.contents => {
                let line = g
                    .lines()
                    .zip(f.contents.lines())
                    .position(|(a, b)| a != b)
                    .map_or(g.lines().count().min(f.contents.lines().count()), |i| i);
                problems.push(format!(
                    "{}: differs from line {}:\n  golden:   {:?}\n  rendered: {:?}",
                    f.path.display(),
                    line + 1,
                    g.lines().nth(line).unwrap_or("<end>"),
                    f.contents.lines().nth(line).unwrap_or("<end>")
                ));
            }
            Ok(_) => {}
        }
    }
    for s in stale {
        problems.push(format!("{}: golden file no longer rendered", s.display()));
    }
    assert!(
        problems.is_empty(),
        "{} problem(s) (regenerate with UPDATE_GOLDEN=1 if intended):\n{}",
        problems.len(),
        problems.join("\n")
    );
}

#[test]
fn rendering_is_deterministic() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/example.com.toml");
    let t = ringmail_deploy::load_file(&example).unwrap();
    assert_eq!(ringmail_deploy::render(&t), ringmail_deploy::render(&t));
}
