//! Reading what is pinned without the agent: each map's type, fill and capacity, for
//! `lb-agent status`. Counting entries walks the keys with `BPF_MAP_GET_NEXT_KEY`, which aya
//! 0.14 only offers through typed maps; a raw walk serves every map whatever its key type.
use std::{
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{MapData, MapInfo};
use serde::Serialize;

/// One pinned map.
#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: String,
    pub kind: String,
    pub entries: u64,
    pub capacity: u32,
}

/// Every map pinned in `dir`, sorted by name.
pub fn pinned_maps(dir: &Path) -> Vec<MapStatus> {
    let mut found: Vec<MapStatus> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|entry| {
                    let path = entry.path();
                    let info = MapInfo::from_pin(&path).ok()?;
                    let data = MapData::from_pin(&path).ok()?;
                    let fd = data.fd().as_fd().as_raw_fd();
                    Some(MapStatus {
                        name: entry.file_name().to_string_lossy().into_owned(),
                        kind: info
                            .map_type()
                            .map(|t| format!("{t:?}"))
                            .unwrap_or_else(|_| "unknown".into()),
                        entries: count_keys(fd, info.key_size(), info.max_entries()),
                        capacity: info.max_entries(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// Number of keys, walked with `BPF_MAP_GET_NEXT_KEY` (at most `limit`, so a map changing
/// under the walk cannot loop forever).
fn count_keys(fd: i32, key_size: u32, limit: u32) -> u64 {
    let mut current = vec![0u8; key_size as usize];
    let mut next = vec![0u8; key_size as usize];
    let mut count = 0u64;
    let mut first = true;
    while count <= u64::from(limit) {
        let key = (!first).then_some(current.as_slice());
        if super::sys::get_next_key(fd, key, &mut next).is_err() {
            break;
        }
        count += 1;
        first = false;
        std::mem::swap(&mut current, &mut next);
    }
    count
}
