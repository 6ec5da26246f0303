//! ringmail-deploy: one topology file in, everything the seed's design needs out.
//!
//! ```text
//!                      ┌─> zone      dns/<domain>.zone, dns/<reverse>.zone (+ NSD include)
//! topology.toml ──> Topology ─┼─> nft       hosts/<host>/nftables.conf (inbound/outbound per role)
//!   (validated:       ├─> bgp       hosts/<lb>/bird.conf|frr.conf, routers/<router>/bird.conf|frr.conf
//!   every error       └─> units     hosts/<host>/ringmail-<role>.toml + ringmail-<role>.service
//!   at once)
//!                     check: live DNS (any resolver) against the records `zone` would render
//! ```
//!
//! Renderers are pure functions of the [`Topology`]: no I/O, deterministic output (golden-file
//! tests pin every byte). The only I/O is reading the topology and its DKIM public keys
//! ([`topology::load_file`]), writing the rendered tree ([`write_tree`]), and the DNS queries
//! of [`check`].
#![forbid(unsafe_code)]

pub mod bgp;
pub mod check;
pub mod nft;
pub mod topology;
pub mod units;
pub mod zone;

use std::path::{Path, PathBuf};

pub use topology::{Topology, load_file};

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use crate::{RenderedFile, Topology};

    /// The shipped example topology (the seed's example.com).
    pub fn example() -> Topology {
        crate::load_file(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/example.com.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The contents of the rendered file at `path`.
    pub fn file<'a>(files: &'a [RenderedFile], path: &str) -> &'a str {
        &files
            .iter()
            .find(|f| f.path == Path::new(path))
            .unwrap_or_else(|| panic!("{path} not rendered"))
            .contents
    }
}

/// One output file, by its path relative to the output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedFile {
    pub path: PathBuf,
    pub contents: String,
}

impl RenderedFile {
    pub fn new(path: String, contents: String) -> RenderedFile {
        RenderedFile {
            path: PathBuf::from(path),
            contents,
        }
    }
}

/// How the rendered files place things on the hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// A directory put in front of every path the role configs and units name: the configs
    /// (/etc/ringmail), the TLS and DKIM keys, the state (/var/lib/ringmail) and a SQLite account
    /// store. A lab or a staging copy then runs unprivileged from that one directory. `None`:
    /// the paths of an installed host.
    pub root: Option<PathBuf>,
}

/// Every file of the deployment, sorted by path, as installed on the hosts.
pub fn render(t: &Topology) -> Vec<RenderedFile> {
    render_with(t, &RenderOptions::default())
}

/// [`render`] with options (see [`RenderOptions`]).
pub fn render_with(t: &Topology, opts: &RenderOptions) -> Vec<RenderedFile> {
    let mut files = zone::render(t);
    files.extend(nft::render(t));
    files.extend(bgp::render(t));
    files.extend(units::render(t, opts));
    files.sort_by(|a, b| a.path.cmp(&b.path));
    files
}

/// Writes `files` under `out` (creating directories). Files are replaced whole; nothing else in
/// `out` is touched.
pub fn write_tree(out: &Path, files: &[RenderedFile]) -> std::io::Result<()> {
    for f in files {
        let path = out.join(&f.path);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension("tmp-ringmail");
        std::fs::write(&tmp, &f.contents)?;
        std::fs::rename(&tmp, &path)?;
    }
    Ok(())
}
