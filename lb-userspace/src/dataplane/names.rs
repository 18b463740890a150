//! The names maps: which Service port each programmed frontend belongs to, so `lb-agent list`
//! can say it without a running agent. One map per family (`LB4_NAMES_V2`, `LB6_NAMES_V1`),
//! keyed by the frontend as programmed; written by difference, like the service maps.
use std::{collections::BTreeMap, path::Path};

use aya::{
    Ebpf, Pod,
    maps::{HashMap, MapData},
};

use super::maps::{open_pinned_hash, take_map};
use crate::{
    model::{Family, Frontend},
    reconcile::{FamilyAddr, frontend_key, frontend_of},
};
use lb_common::{Addr4, Addr6, NameKey, ServiceName, map_names};

/// One family's names map.
struct FamilyNames<A: FamilyAddr>
where
    NameKey<A>: Pod,
{
    map: HashMap<MapData, NameKey<A>, ServiceName>,
}

impl<A: FamilyAddr> FamilyNames<A>
where
    NameKey<A>: Pod,
{
    fn key(frontend: &Frontend) -> Option<NameKey<A>> {
        Some(NameKey {
            frontend: frontend_key(frontend)?,
        })
    }

    fn get(&self, frontend: &Frontend) -> Option<String> {
        let name = self.map.get(&Self::key(frontend)?, 0).ok()?;
        Some(name.as_str().to_owned())
    }

    fn put(&mut self, frontend: &Frontend, name: &str) -> anyhow::Result<()> {
        let key = Self::key(frontend)
            .ok_or_else(|| anyhow::anyhow!("{frontend} is not of this names map's family"))?;
        self.map.insert(key, ServiceName::new(name), 0)?;
        Ok(())
    }

    fn remove(&mut self, frontend: &Frontend) {
        if let Some(key) = Self::key(frontend) {
            let _ = self.map.remove(&key);
        }
    }

    fn all_into(&self, found: &mut BTreeMap<Frontend, String>) {
        for (key, name) in self.map.iter().filter_map(Result::ok) {
            if let Some(frontend) = frontend_of(&key.frontend) {
                found.insert(frontend, name.as_str().to_owned());
            }
        }
    }
}

pub struct NamesMap {
    v4: FamilyNames<Addr4>,
    /// `None` for pins an IPv4-only agent left (read by `list` and `describe`).
    v6: Option<FamilyNames<Addr6>>,
}

impl NamesMap {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        Ok(Self {
            v4: FamilyNames {
                map: HashMap::try_from(take_map(ebpf, map_names::SERVICE_NAMES_V4)?)?,
            },
            v6: Some(FamilyNames {
                map: HashMap::try_from(take_map(ebpf, map_names::SERVICE_NAMES_V6)?)?,
            }),
        })
    }

    pub fn open_pinned(dir: &Path) -> anyhow::Result<Self> {
        Ok(Self {
            v4: FamilyNames {
                map: HashMap::try_from(open_pinned_hash(dir, map_names::SERVICE_NAMES_V4)?)?,
            },
            v6: if dir.join(map_names::SERVICE_NAMES_V6).exists() {
                Some(FamilyNames {
                    map: HashMap::try_from(open_pinned_hash(dir, map_names::SERVICE_NAMES_V6)?)?,
                })
            } else {
                None
            },
        })
    }

    pub fn put(&mut self, frontend: &Frontend, name: &str) -> anyhow::Result<()> {
        match frontend.family() {
            Family::V4 => self.v4.put(frontend, name),
            Family::V6 => match &mut self.v6 {
                Some(v6) => v6.put(frontend, name),
                None => anyhow::bail!("no IPv6 names map is pinned"),
            },
        }
    }

    /// Removes a name and returns it (`None` when there was none).
    pub fn take_name(&mut self, frontend: &Frontend) -> Option<String> {
        let name = match frontend.family() {
            Family::V4 => self.v4.get(frontend),
            Family::V6 => self.v6.as_ref().and_then(|v6| v6.get(frontend)),
        };
        self.remove(frontend);
        name
    }

    /// Removes a name; one that is not there is fine.
    pub fn remove(&mut self, frontend: &Frontend) {
        match frontend.family() {
            Family::V4 => self.v4.remove(frontend),
            Family::V6 => {
                if let Some(v6) = &mut self.v6 {
                    v6.remove(frontend);
                }
            }
        }
    }

    /// Every name of both families, by frontend.
    pub fn all(&self) -> BTreeMap<Frontend, String> {
        let mut found = BTreeMap::new();
        self.v4.all_into(&mut found);
        if let Some(v6) = &self.v6 {
            v6.all_into(&mut found);
        }
        found
    }

    /// Makes the maps hold exactly `wanted` (after a restart: what an earlier agent wrote is
    /// read and corrected).
    pub fn sync_all(&mut self, wanted: &BTreeMap<Frontend, String>) -> anyhow::Result<()> {
        let had = self.all();
        for frontend in had.keys().filter(|k| !wanted.contains_key(k)) {
            self.remove(frontend);
        }
        for (frontend, name) in wanted {
            if had.get(frontend) != Some(name) {
                self.put(frontend, name)?;
            }
        }
        Ok(())
    }
}
