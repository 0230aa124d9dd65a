//! A pin directory on bpffs for one test (only the tests that pin include this).

/// A pin directory of one test, removed (with everything pinned in it) on drop.
pub struct Pins(std::path::PathBuf);

impl Pins {
    pub fn new(test: &str) -> Self {
        let dir = std::path::PathBuf::from(format!(
            "/sys/fs/bpf/fleetmesh-test-{}-{test}",
            std::process::id()
        ));
        mesh_agent::datapath::remove_pins(&dir).expect("remove leftover pins");
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = mesh_agent::datapath::remove_pins(&self.0) {
            eprintln!("warning: {e:#}");
        }
    }
}
