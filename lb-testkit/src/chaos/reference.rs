//! The fresh build to compare with: a second agent, on a node namespace of its own with the
//! same addresses, its own cgroup and pins, started on a copy of the manifest directory,
//! described once ready, and stopped (`--cleanup-on-exit`). Descriptions are kept by the
//! manifests' contents, so each distinct source costs one start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

use super::churn::snapshot;
use super::site::{AgentSpec, Uplinked, describe};
use crate::{BpffsDir, Cgroup};

pub struct Reference {
    agent: PathBuf,
    net: Uplinked,
    cgroup: Cgroup,
    manifests: PathBuf,
    log: PathBuf,
    cache: HashMap<String, serde_json::Value>,
    /// Fresh agents started so far.
    pub starts: u64,
}

impl Reference {
    pub fn new(agent: &Path, work: &Path) -> Result<Reference> {
        let manifests = work.join("reference-manifests");
        std::fs::create_dir_all(&manifests)?;
        Ok(Reference {
            agent: agent.to_owned(),
            net: Uplinked::new().context("the reference node")?,
            cgroup: Cgroup::new("chref")?,
            manifests,
            log: work.join("reference.log"),
            cache: HashMap::new(),
            starts: 0,
        })
    }

    /// The description a fresh agent programs from the manifests in `dir`.
    pub fn describe(&mut self, dir: &Path) -> Result<serde_json::Value> {
        let key = snapshot(dir)?;
        if let Some(known) = self.cache.get(&key) {
            return Ok(known.clone());
        }
        self.copy_from(dir)?;
        let bpffs = BpffsDir::new();
        let spec = AgentSpec {
            agent: &self.agent,
            netns: self.net.node.netns(),
            cgroup: &self.cgroup,
            bpffs: &bpffs,
            manifests: &self.manifests,
            log: &self.log,
            extra: vec!["--cleanup-on-exit".into()],
        };
        let mut agent = spec.start().context("starting the reference agent")?;
        self.starts += 1;
        // Ready means its first full sync is written; read until two reads agree.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = describe(&self.agent, bpffs.path())?;
        let settled = loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = describe(&self.agent, bpffs.path())?;
            if now == last {
                break now;
            }
            if Instant::now() > deadline {
                bail!("the reference agent's maps did not settle within 10s");
            }
            last = now;
        };
        agent.terminate();
        self.cache.insert(key, settled.clone());
        Ok(settled)
    }

    /// Makes the reference's manifest directory a copy of `dir`.
    fn copy_from(&self, dir: &Path) -> Result<()> {
        for entry in std::fs::read_dir(&self.manifests)? {
            std::fs::remove_file(entry?.path())?;
        }
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name() else {
                continue;
            };
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            std::fs::copy(&path, self.manifests.join(name))
                .with_context(|| format!("copying {}", path.display()))?;
        }
        Ok(())
    }
}
