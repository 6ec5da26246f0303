//! A private Postfix instance in a temporary directory (not the system Postfix), for tests
//! that need a real remote MTA: the sender relaying to us, or the remote domain's MX that
//! ringmail's MTA delivers to. Needs root (Postfix runs its daemons as `postfix`). Stopped,
//! bounded in time, when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{ChildGuard, TempDir, run_bounded, wait_for};

pub const POSTFIX: &str = "/usr/sbin/postfix";
pub const POSTCONF: &str = "/usr/sbin/postconf";
pub const SENDMAIL: &str = "/usr/sbin/sendmail";

/// Debian's services with chroot off (the queue is a temp dir); no smtpd listener.
const MASTER: &str = "\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
virtual   unix  -       n       n       -       -       virtual
";

pub struct Postfix {
    pub dir: TempDir,
}

impl Postfix {
    /// An instance whose main.cf is the private paths plus `main_extra`, and whose master.cf
    /// is the usual services plus `master_extra` (e.g. an `smtpd` listener line).
    pub fn with_config(tag: &str, main_extra: &str, master_extra: &str) -> Postfix {
        let dir = TempDir::new(tag);
        let d = dir.path().display().to_string();
        for sub in ["etc", "queue", "data", "mail"] {
            fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        run_bounded(
            Command::new("chmod").args(["755", &d, &format!("{d}/etc"), &format!("{d}/queue")]),
            Duration::from_secs(5),
        );
        let (st, out) = run_bounded(
            Command::new("chown").args(["postfix", &format!("{d}/data"), &format!("{d}/mail")]),
            Duration::from_secs(5),
        );
        assert!(st.success(), "chown: {out}");
        let main = format!(
            "# Private test instance, not the system Postfix.\n\
             compatibility_level = 3.6\n\
             config_directory = {d}/etc\nqueue_directory = {d}/queue\ndata_directory = {d}/data\n\
             mail_owner = postfix\nsetgid_group = postdrop\n\
             alias_maps =\nalias_database =\n\
             biff = no\nmaillog_file_prefixes = {d}\nmaillog_file = {d}/maillog\n{main_extra}"
        );
        fs::write(dir.path().join("etc/main.cf"), main).unwrap();
        fs::write(
            dir.path().join("etc/master.cf"),
            format!("{MASTER}{master_extra}"),
        )
        .unwrap();
        Postfix { dir }
    }

    pub fn etc(&self) -> PathBuf {
        self.dir.path().join("etc")
    }

    /// Where `virtual` delivery puts mail in tests that use it (`{dir}/mail`).
    pub fn mail_dir(&self) -> PathBuf {
        self.dir.path().join("mail")
    }

    pub fn maillog(&self) -> String {
        fs::read_to_string(self.dir.path().join("maillog")).unwrap_or_default()
    }

    pub fn master_pid(&self) -> Option<i32> {
        let pid: i32 = fs::read_to_string(self.dir.path().join("queue/pid/master.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    pub fn start(&self) {
        let etc = self.etc();
        // `postfix check` creates the queue directories.
        let (st, out) = run_bounded(
            Command::new(POSTFIX).arg("-c").arg(&etc).arg("check"),
            Duration::from_secs(30),
        );
        assert!(st.success(), "postfix check: {out}\n{}", self.maillog());
        let (st, out) = run_bounded(
            Command::new(POSTFIX).arg("-c").arg(&etc).arg("start"),
            Duration::from_secs(30),
        );
        assert!(st.success(), "postfix start: {out}\n{}", self.maillog());
        assert!(
            wait_for(Duration::from_secs(10), || self.master_pid()).is_some(),
            "postfix master not running:\n{}",
            self.maillog()
        );
    }

    /// `postconf -e` settings, then `postfix reload`.
    pub fn reconfigure(&self, settings: &[&str]) {
        let (st, out) = run_bounded(
            Command::new(POSTCONF)
                .arg("-c")
                .arg(self.etc())
                .arg("-e")
                .args(settings),
            Duration::from_secs(10),
        );
        assert!(st.success(), "postconf -e: {out}");
        let (st, out) = run_bounded(
            Command::new(POSTFIX)
                .arg("-c")
                .arg(self.etc())
                .arg("reload"),
            Duration::from_secs(30),
        );
        assert!(st.success(), "postfix reload: {out}\n{}", self.maillog());
    }

    /// `sendmail -C etc -f from to` with `msg` on stdin, bounded.
    pub fn sendmail(&self, from: &str, to: &str, msg: &[u8]) {
        let mut child = Command::new(SENDMAIL)
            .arg("-C")
            .arg(self.etc())
            .args(["-f", from, to])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sendmail");
        child.stdin.take().unwrap().write_all(msg).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("sendmail did not finish within 30 s");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        let _ = child.stderr.take().unwrap().read_to_string(&mut err);
        assert!(
            status.success(),
            "sendmail: {status}: {err}\n{}",
            self.maillog()
        );
    }

    /// Every file delivered into the Maildir `{mail_dir}/{name}/new`.
    pub fn maildir_messages(&self, name: &str) -> Vec<Vec<u8>> {
        let dir = self.mail_dir().join(name).join("new");
        let mut files: Vec<_> = fs::read_dir(&dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        files.iter().filter_map(|p| fs::read(p).ok()).collect()
    }
}

/// Every descendant of `pid` (from /proc), deepest last.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parent: HashMap<i32, i32> = HashMap::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat"))
                && let Some(after) = stat.rfind(')').map(|i| &stat[i + 2..])
                && let Some(pp) = after.split(' ').nth(1).and_then(|s| s.parse().ok())
            {
                parent.insert(p, pp);
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for (&c, &pp) in &parent {
            if pp == p && !out.contains(&c) {
                out.push(c);
                frontier.push(c);
            }
        }
    }
    out
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let pid = self.master_pid();
        let mut stop = Command::new(POSTFIX);
        stop.arg("-c").arg(self.etc()).arg("stop");
        if let Ok(mut g) =
            ChildGuard::spawn("postfix stop", &mut stop, self.dir.path().join("stop.log"))
        {
            let _ = g.wait_timeout(Duration::from_secs(20));
        }
        if let Some(pid) = pid {
            let gone = wait_for(Duration::from_secs(10), || {
                (!Path::new(&format!("/proc/{pid}")).exists()).then_some(())
            });
            if gone.is_none() {
                let mut all = descendants(pid);
                all.insert(0, pid);
                for p in all {
                    let _ = Command::new("kill")
                        .args(["-KILL", &p.to_string()])
                        .status();
                }
            }
        }
    }
}
