//! (being written)

use crate::RenderedFile;
use crate::topology::Topology;

pub fn render(_t: &Topology) -> Vec<RenderedFile> {
    Vec::new()
}
