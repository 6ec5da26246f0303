//! The rendered BGP daemon configs and systemd units, checked by the real tools: `bird -p -c`
//! for every BIRD config, `vtysh --dryrun -f` for every FRR config, `systemd-analyze verify` for
//! every unit. The example topology is rendered as is (mode bird) and with its mode switched to
//! frr and speaker.
//!
//! A missing bird, vtysh or systemd-analyze skips its check with a message, unless
//! RINGMAIL_REQUIRE_ALL=1 (CI), where it fails instead (.ci/run installs bird2, frr and
//! systemd). The role configs are checked by the root package's `tests/deploy_render.rs`
//! (it needs the `ringmail` binary).

use std::path::{Path, PathBuf};
use std::process::Command;

use ringmail_deploy::topology::BgpMode;
use ringmail_deploy::{RenderedFile, Topology, load_file, render, write_tree};

fn example() -> Topology {
    load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/example.com.toml")).unwrap()
}

fn require_all() -> bool {
    std::env::var("RINGMAIL_REQUIRE_ALL").is_ok_and(|v| v == "1")
}

/// The tool's path, or None (with a message) when it is not installed.
fn tool(candidates: &[&str]) -> Option<PathBuf> {
    let found = candidates.iter().map(PathBuf::from).find(|p| p.exists());
    if found.is_none() {
        assert!(
            !require_all(),
            "{} not installed and RINGMAIL_REQUIRE_ALL=1",
            candidates[0]
        );
        eprintln!("SKIP: {} not installed", candidates[0]);
    }
    found
}

/// A fresh directory under the target directory (removed first).
fn out_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("render-checks-{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn with_mode(mode: BgpMode) -> (Topology, Vec<RenderedFile>) {
    let mut t = example();
    t.bgp.mode = mode;
    let files = render(&t);
    (t, files)
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("running the checker");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn check_files(
    files: &[RenderedFile],
    dir: &Path,
    suffix: &str,
    check: impl Fn(&Path) -> (bool, String),
) -> usize {
    write_tree(dir, files).unwrap();
    let mut n = 0;
    let mut failures = Vec::new();
    for f in files
        .iter()
        .filter(|f| f.path.to_string_lossy().ends_with(suffix))
    {
        let path = dir.join(&f.path);
        let (ok, text) = check(&path);
        if !ok {
            failures.push(format!("{}:\n{text}", f.path.display()));
        }
        n += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    n
}

fn bird_check(files: &[RenderedFile], dir: &Path) -> usize {
    let Some(bird) = tool(&["/usr/sbin/bird", "/usr/bin/bird"]) else {
        return 0;
    };
    check_files(files, dir, "bird.conf", |p| {
        run(Command::new(&bird).arg("-p").arg("-c").arg(p))
    })
}

fn frr_check(files: &[RenderedFile], dir: &Path) -> usize {
    let Some(vtysh) = tool(&["/usr/bin/vtysh"]) else {
        return 0;
    };
    check_files(files, dir, "frr.conf", |p| {
        let (ok, text) = run(Command::new(&vtysh).arg("--dryrun").arg("-f").arg(p));
        // vtysh --dryrun reports bad lines on stderr; its exit status says whether any failed.
        (
            ok && !text.contains("% Unknown") && !text.contains("% Invalid"),
            text,
        )
    })
}

#[test]
fn bird_mode_configs_pass_bird_and_vtysh() {
    let (_, files) = with_mode(BgpMode::Bird);
    let dir = out_dir("bird");
    let n = bird_check(&files, &dir);
    if n > 0 {
        // 4 LBs + 4 routers.
        assert_eq!(n, 8);
    }
    let n = frr_check(&files, &dir);
    if n > 0 {
        assert_eq!(n, 4, "one per router");
    }
}

#[test]
fn frr_mode_configs_pass_bird_and_vtysh() {
    let (_, files) = with_mode(BgpMode::Frr);
    let dir = out_dir("frr");
    let n = frr_check(&files, &dir);
    if n > 0 {
        assert_eq!(n, 8, "4 LBs + 4 routers");
    }
    let n = bird_check(&files, &dir);
    if n > 0 {
        assert_eq!(n, 4, "routers only");
    }
}

#[test]
fn speaker_mode_configs_pass_bird_and_vtysh() {
    let (_, files) = with_mode(BgpMode::Speaker);
    assert!(
        files
            .iter()
            .filter(|f| f.path.starts_with("hosts"))
            .all(|f| !f.path.to_string_lossy().ends_with(".conf")
                || f.path.to_string_lossy().ends_with("nftables.conf")),
        "no daemon config on the LBs in speaker mode"
    );
    let dir = out_dir("speaker");
    bird_check(&files, &dir);
    frr_check(&files, &dir);
}

/// `systemd-analyze verify` on every rendered unit. The units name /usr/bin/ringmail and users
/// that do not exist here, so the test's copy points ExecStart at /bin/true; everything else is
/// verified as rendered.
#[test]
fn units_pass_systemd_analyze_verify() {
    let Some(analyze) = tool(&["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]) else {
        return;
    };
    for mode in [BgpMode::Bird, BgpMode::Speaker] {
        let (_, files) = with_mode(mode);
        let units: Vec<RenderedFile> = files
            .iter()
            .filter(|f| f.path.extension().is_some_and(|e| e == "service"))
            .map(|f| RenderedFile {
                path: f.path.clone(),
                contents: f.contents.replace("/usr/bin/ringmail ", "/bin/true "),
            })
            .collect();
        assert!(!units.is_empty());
        let dir = out_dir(&format!("units-{mode:?}"));
        let n = check_files(&units, &dir, ".service", |p| {
            let (ok, text) = run(Command::new(&analyze)
                .arg("verify")
                .arg("--man=no")
                .arg(p)
                .env("SYSTEMD_LOG_LEVEL", "notice"));
            // verify exits 0 on unknown keys and bad values (it only warns, naming the file and
            // line), so every line naming the file fails the check, except complaints about the
            // environment (the users do not exist here).
            let own: Vec<&str> = text
                .lines()
                .filter(|l| l.contains(&*p.file_name().unwrap().to_string_lossy()))
                .filter(|l| {
                    !l.contains("Failed to resolve user")
                        && !l.contains("Failed to determine user credentials")
                })
                .collect();
            (
                ok && own.is_empty(),
                format!("{text}\n(own lines: {own:?})"),
            )
        });
        // 20 hosts, one role each.
        assert_eq!(n, 20);
    }
}
