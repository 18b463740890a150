//! The names map: which Service port each programmed frontend belongs to, so `lb-agent list`
//! can say it without a running agent. Written by difference, like the service maps.
use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap, MapData},
};

use super::maps::{open_pinned_hash, take_map};
use lb_common::{NameKey4, ServiceName, map_names};

pub struct NamesMap {
    map: HashMap<MapData, NameKey4, ServiceName>,
}

impl NamesMap {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            map: HashMap::try_from(take_map(ebpf, map_names::SERVICE_NAMES_V4)?)?,
        })
    }

    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            map: HashMap::try_from(open_pinned_hash(dir, map_names::SERVICE_NAMES_V4)?)?,
        })
    }

    pub fn put(&mut self, key: NameKey4, name: &str) -> anyhow::Result<()> {
        self.map.insert(key, ServiceName::new(name), 0)?;
        Ok(())
    }

    /// Removes a name and returns it (`None` when there was none).
    pub fn take_name(&mut self, key: &NameKey4) -> Option<String> {
        let name = self.map.get(key, 0).ok().map(|n| n.as_str().to_owned());
        self.remove(key);
        name
    }

    /// Removes a name; one that is not there is fine.
    pub fn remove(&mut self, key: &NameKey4) {
        let _ = self.map.remove(key);
    }

    /// Every name, by frontend.
    pub fn all(&self) -> BTreeMap<NameKey4, String> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .map(|(key, name)| (key, name.as_str().to_owned()))
            .collect()
    }

    /// Makes the map hold exactly `wanted` (after a restart: what an earlier agent wrote is
    /// read and corrected).
    pub fn sync_all(&mut self, wanted: &BTreeMap<NameKey4, String>) -> anyhow::Result<()> {
        let had = self.all();
        for key in had.keys().filter(|k| !wanted.contains_key(k)) {
            self.remove(key);
        }
        for (key, name) in wanted {
            if had.get(key) != Some(name) {
                self.put(*key, name)?;
            }
        }
        Ok(())
    }
}
