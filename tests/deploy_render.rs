//! `ringmail deploy render`: every rendered role config loads with the real schema
//! (`ringmail ROLE --check --config FILE`), for the example topology in each BGP mode (bird as
//! shipped, frr and speaker by switching the mode in the loaded topology), and the CLI writes the
//! BGP configs and units next to them. The daemon-config and unit checks (bird -p, vtysh
//! --dryrun, systemd-analyze verify) are in deploy/tests/render_checks.rs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{RINGMAIL, TempDir, check_config, run_bounded};
use ringmail_deploy::topology::BgpMode;
use ringmail_deploy::{Topology, load_file, render};

fn example_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/examples/example.com.toml")
}

/// The example with its DKIM private keys pointing at a key generated in `dir` (`mta --check`
/// reads the key files; the topology's paths are on the MTA hosts, not here).
fn example_with_keys(dir: &Path) -> Topology {
    let mut t = load_file(&example_path()).unwrap();
    for d in &mut t.domains {
        for k in &mut d.dkim {
            let out = dir.join(format!("{}._domainkey.{}.key", k.selector, d.name));
            let (status, text) = run_bounded(
                Command::new(RINGMAIL)
                    .args(["dkim", "keygen", "--algo", "ed25519", "--domain"])
                    .arg(d.name.as_str())
                    .arg("--selector")
                    .arg(&k.selector)
                    .arg("--out")
                    .arg(&out),
                Duration::from_secs(20),
            );
            assert!(status.success(), "dkim keygen: {text}");
            k.private_key_path = out;
        }
    }
    t
}

fn check_every_role_config(mode: BgpMode) {
    let dir = TempDir::new(&format!("deploy-render-{mode:?}"));
    let mut t = example_with_keys(dir.path());
    t.bgp.mode = mode;
    let files = render(&t);
    let mut checked = 0;
    let mut failures = Vec::new();
    for f in &files {
        let name = f.path.file_name().unwrap().to_string_lossy().to_string();
        let Some(role) = name
            .strip_prefix("ringmail-")
            .and_then(|n| n.strip_suffix(".toml"))
        else {
            continue;
        };
        let (code, out) = check_config(dir.path(), role, &f.contents);
        if code != Some(0) {
            failures.push(format!(
                "{} ({role}): exit {code:?}\n{out}\n--- file ---\n{}",
                f.path.display(),
                f.contents
            ));
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // 20 hosts with one role each: 4 LBs and 4 of every mail role.
    assert_eq!(checked, 20, "role configs rendered");
}

#[test]
fn role_configs_load_in_bird_mode() {
    check_every_role_config(BgpMode::Bird);
}

#[test]
fn role_configs_load_in_frr_mode() {
    check_every_role_config(BgpMode::Frr);
}

#[test]
fn role_configs_load_in_speaker_mode() {
    check_every_role_config(BgpMode::Speaker);
}

/// The CLI writes the whole tree: zones, role configs, units, the LBs' and routers' BGP configs.
#[test]
fn cli_writes_configs_units_and_bgp_files() {
    let dir = TempDir::new("deploy-render-cli");
    let out = dir.path().join("out");
    let (status, text) = run_bounded(
        Command::new(RINGMAIL)
            .args(["deploy", "render", "--topology"])
            .arg(example_path())
            .arg("--out")
            .arg(&out),
        Duration::from_secs(30),
    );
    assert!(status.success(), "deploy render: {text}");
    for f in [
        "hosts/lb-a1.example.com/ringmail-lb.toml",
        "hosts/lb-a1.example.com/ringmail-lb.service",
        "hosts/lb-a1.example.com/bird.conf",
        "hosts/mta-b2.example.com/ringmail-mta.toml",
        "hosts/mda-a1.example.com/ringmail-mda.service",
        "routers/rt-b1/bird.conf",
        "routers/rt-b1/frr.conf",
    ] {
        assert!(out.join(f).is_file(), "{f} not written:\n{text}");
    }
}
