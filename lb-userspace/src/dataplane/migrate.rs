//! Pinned maps that no longer have the shape the object asks for.
//!
//! aya reuses a map pinned under a map's name whatever its type, key and value sizes,
//! capacity and flags: a raised `--max-services` would silently keep the old capacity, and a
//! layout change without a rename would make the new programs read the old bytes. So, before
//! the object is loaded, every map the object pins by name is compared with the map pinned
//! under that name (the kernel's `BPF_OBJ_GET_INFO_BY_FD`):
//!
//! - the same shape: the loader reuses it with its contents, as before;
//! - the same type, key and value sizes, another capacity or other flags: the pin is moved
//!   aside to `<name>-old`, the loader creates the new map, and every entry is copied over
//!   (raw bytes), so the reconciler adopts them and traffic never stops;
//! - another type or layout: moved aside the same way, and nothing is carried: the agent
//!   rebuilds its service maps from the source, and the data path's caches start empty.
//!
//! The running programs keep the old map (they hold it, not its pin) until the new ones are
//! linked; then [`top_up`] copies what the old programs added to their caches meanwhile and
//! [`PinDir::remove_maps_except`](super::bpffs::PinDir::remove_maps_except) removes the
//! `-old` pins with the other pins the object does not use.
//!
//! Nothing here knows the maps' names or types: it works on whatever the object defines.
use std::{
    collections::BTreeMap,
    fmt,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow, bail};
use aya::maps::{MapData, MapInfo, MapType};
use aya_obj::{Object, generated::bpf_map_type, maps::PinningType};

use super::sys;

/// Where a pin moved aside waits for the new programs: `<name>-old`, next to the new map
/// (bpffs refuses names with a dot, and a map's name has no dash).
pub const ASIDE_SUFFIX: &str = "-old";

/// Flags that belong to a descriptor, not to the map: the kernel does not keep them.
const DESCRIPTOR_FLAGS: u32 = (1 << 3) /* BPF_F_RDONLY */ | (1 << 4) /* BPF_F_WRONLY */;

/// What the kernel fixes when a map is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapShape {
    /// `bpf_map_type`, as the kernel numbers it.
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl MapShape {
    /// The shape the object defines for `map`, with the capacity the loader sets.
    fn of_object(map: &aya_obj::Map, max_entries: Option<u32>) -> Self {
        Self {
            map_type: map.map_type(),
            key_size: map.key_size(),
            value_size: map.value_size(),
            max_entries: max_entries.unwrap_or(map.max_entries()),
            flags: map.map_flags() & !DESCRIPTOR_FLAGS,
        }
    }

    /// The shape of the map pinned at `pin`.
    pub fn of_pin(pin: &Path) -> anyhow::Result<Self> {
        let info = MapInfo::from_pin(pin)
            .with_context(|| format!("reading the pinned map {}", pin.display()))?;
        Self::of_info(&info)
    }

    fn of_info(info: &MapInfo) -> anyhow::Result<Self> {
        Ok(Self {
            map_type: info.map_type()? as u32,
            key_size: info.key_size(),
            value_size: info.value_size(),
            max_entries: info.max_entries(),
            flags: info.map_flags() & !DESCRIPTOR_FLAGS,
        })
    }

    fn kind(&self) -> Option<MapType> {
        bpf_map_type::try_from(self.map_type)
            .ok()
            .and_then(|t| MapType::try_from(t).ok())
    }

    /// Whether the same type, key size and value size: the bytes of an entry mean the same.
    fn same_layout(&self, other: &Self) -> bool {
        self.map_type == other.map_type
            && self.key_size == other.key_size
            && self.value_size == other.value_size
    }

    /// Entries are plain bytes that can be walked and copied from user space (not program or
    /// map descriptors, sockets, or a queue's order).
    fn copyable(&self) -> bool {
        matches!(
            self.kind(),
            Some(
                MapType::Hash
                    | MapType::LruHash
                    | MapType::PerCpuHash
                    | MapType::LruPerCpuHash
                    | MapType::Array
                    | MapType::PerCpuArray
                    | MapType::LpmTrie
            )
        )
    }

    /// Filled by the programs themselves (flows, affinity): what they add while the agent
    /// starts is worth carrying again, without overwriting.
    fn is_cache(&self) -> bool {
        matches!(self.kind(), Some(MapType::LruHash | MapType::LruPerCpuHash))
    }

    /// Bytes one lookup returns: per-CPU maps hold a value per possible CPU, each rounded up
    /// to 8 bytes.
    fn value_buffer_len(&self, possible_cpus: usize) -> usize {
        let per_cpu = matches!(
            self.kind(),
            Some(MapType::PerCpuHash | MapType::LruPerCpuHash | MapType::PerCpuArray)
        );
        if per_cpu {
            (self.value_size as usize).next_multiple_of(8) * possible_cpus
        } else {
            self.value_size as usize
        }
    }
}

impl fmt::Display for MapShape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind() {
            Some(kind) => write!(f, "{kind:?}")?,
            None => write!(f, "type {}", self.map_type)?,
        }
        write!(
            f,
            "(key {} B, value {} B, {} entries, flags {:#x})",
            self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

/// What becomes of a pinned map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The shape the object asks for: reused with its contents.
    Reuse,
    /// Same layout, another capacity or other flags: a new map, the entries copied over.
    Carry,
    /// Another type or layout, or not a map that can be read: a new, empty map.
    Rebuild,
}

/// Compares the shape the object asks for with the pinned map's (`None`: it could not be
/// read).
pub fn verdict(wanted: &MapShape, pinned: Option<&MapShape>) -> Verdict {
    match pinned {
        Some(pinned) if pinned == wanted => Verdict::Reuse,
        Some(pinned) if pinned.same_layout(wanted) && wanted.copyable() => Verdict::Carry,
        _ => Verdict::Rebuild,
    }
}

/// The maps `object` pins by name, with their shapes once the loader applies `max_entries`
/// (map name, capacity: what the loader gets through `EbpfLoader::map_max_entries`).
pub fn pinned_shapes(
    object: &[u8],
    max_entries: &[(&str, u32)],
) -> anyhow::Result<BTreeMap<String, MapShape>> {
    let object = Object::parse(object).context("parsing the eBPF object's map definitions")?;
    Ok(object
        .maps
        .iter()
        .filter(|(_, map)| map.pinning() == PinningType::ByName)
        .map(|(name, map)| {
            let capacity = max_entries
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, entries)| *entries);
            (name.clone(), MapShape::of_object(map, capacity))
        })
        .collect())
}

/// One map moved aside before the load.
#[derive(Debug)]
struct Moved {
    name: String,
    verdict: Verdict,
    /// `None`: the pinned map could not be read.
    old: Option<MapShape>,
}

/// The pins moved aside before a load, to finish with [`Migration::complete`].
#[derive(Debug)]
#[must_use = "complete() carries the entries over, or puts the pins back"]
pub struct Migration {
    dir: PathBuf,
    moved: Vec<Moved>,
}

/// The pin of map `name` moved aside.
pub fn aside(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{ASIDE_SUFFIX}"))
}

fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

/// Before the load: compares each map `object` pins by name with what is pinned in `dir`, and
/// moves aside the pins the loader must not reuse.
pub fn prepare(
    object: &[u8],
    dir: &Path,
    max_entries: &[(&str, u32)],
) -> anyhow::Result<Migration> {
    prepare_shapes(&pinned_shapes(object, max_entries)?, dir, |pin| {
        MapShape::of_pin(pin)
    })
}

/// [`prepare`] for given shapes, reading pinned shapes with `read`.
fn prepare_shapes(
    wanted: &BTreeMap<String, MapShape>,
    dir: &Path,
    read: impl Fn(&Path) -> anyhow::Result<MapShape>,
) -> anyhow::Result<Migration> {
    let mut migration = Migration {
        dir: dir.to_owned(),
        moved: Vec::new(),
    };
    match move_aside(wanted, &mut migration, read) {
        Ok(()) => Ok(migration),
        Err(error) => {
            migration.roll_back();
            Err(error)
        }
    }
}

fn move_aside(
    wanted: &BTreeMap<String, MapShape>,
    migration: &mut Migration,
    read: impl Fn(&Path) -> anyhow::Result<MapShape>,
) -> anyhow::Result<()> {
    let dir = migration.dir.clone();
    let dir = dir.as_path();
    for (name, shape) in wanted {
        let pin = dir.join(name);
        let aside = aside(dir, name);
        if !exists(&pin) && exists(&aside) {
            // An agent stopped between moving the pin aside and loading: the old map is still
            // the one to compare (and, as far as anyone knows, the one the programs use).
            std::fs::rename(&aside, &pin).with_context(|| {
                format!("putting {} back to {}", aside.display(), pin.display())
            })?;
            tracing::info!(map = %name, "put back a map an interrupted start had moved aside");
        }
        if !exists(&pin) {
            continue;
        }
        let old = match read(&pin) {
            Ok(old) => Some(old),
            Err(error) => {
                tracing::warn!(map = %name, error = %format!("{error:#}"), "cannot read the pinned map; replacing it");
                None
            }
        };
        let verdict = verdict(shape, old.as_ref());
        if verdict == Verdict::Reuse {
            continue;
        }
        if exists(&aside) {
            // Left by a start that never linked its programs: the map pinned now is the newer
            // one, and the programs hold whichever they use, pin or not. If the still-linked
            // programs use the aside one, what they added to an LRU map since that start is
            // not carried (the next flows refill it): a known gap after two aborted starts,
            // as the pins do not say which map the linked programs hold.
            std::fs::remove_file(&aside)
                .with_context(|| format!("removing the stale {}", aside.display()))?;
        }
        std::fs::rename(&pin, &aside)
            .with_context(|| format!("moving {} aside to {}", pin.display(), aside.display()))?;
        migration.moved.push(Moved {
            name: name.clone(),
            verdict,
            old,
        });
    }
    Ok(())
}

impl Migration {
    /// No pin was moved aside.
    pub fn is_empty(&self) -> bool {
        self.moved.is_empty()
    }

    /// After the load: when it succeeded, copies the entries of the maps moved aside into the
    /// new ones where the layout allows it, logging one line per map; when it failed, puts the
    /// old pins back (the programs running still use them).
    pub fn complete<T, E>(self, loaded: Result<T, E>) -> Result<T, E> {
        match loaded {
            Ok(loaded) => {
                self.carry();
                Ok(loaded)
            }
            Err(error) => {
                self.roll_back();
                Err(error)
            }
        }
    }

    fn carry(&self) {
        for moved in &self.moved {
            let pin = self.dir.join(&moved.name);
            let old = moved
                .old
                .map_or_else(|| "an unreadable map".to_owned(), |s| s.to_string());
            let new = MapShape::of_pin(&pin)
                .map_or_else(|e| format!("an unreadable map ({e:#})"), |s| s.to_string());
            let name = &moved.name;
            if moved.verdict == Verdict::Rebuild {
                tracing::warn!(
                    map = %name,
                    carried = 0,
                    "map {name} migrated from {old} to {new}: another layout, nothing carried, \
                     rebuilt from the source"
                );
                continue;
            }
            match copy_pinned(&aside(&self.dir, name), &pin, UpdateMode::Any) {
                Ok(copied) if copied.dropped == 0 => tracing::info!(
                    map = %name,
                    carried = copied.copied,
                    "map {name} migrated from {old} to {new}: {} entries carried over",
                    copied.copied
                ),
                Ok(copied) => tracing::warn!(
                    map = %name,
                    carried = copied.copied,
                    dropped = copied.dropped,
                    "map {name} migrated from {old} to {new}: {} entries carried over, {} did \
                     not fit ({})",
                    copied.copied,
                    copied.dropped,
                    copied.first_error.unwrap_or_default()
                ),
                Err(error) => tracing::warn!(
                    map = %name,
                    carried = 0,
                    error = %format!("{error:#}"),
                    "map {name} migrated from {old} to {new}: its entries could not be carried, \
                     rebuilt from the source"
                ),
            }
        }
    }

    fn roll_back(&self) {
        for moved in &self.moved {
            let pin = self.dir.join(&moved.name);
            let aside = aside(&self.dir, &moved.name);
            let restored = (!exists(&pin) || std::fs::remove_file(&pin).is_ok())
                && std::fs::rename(&aside, &pin).is_ok();
            if !restored {
                tracing::warn!(map = %moved.name, "could not put the pinned map back after the failed load");
            }
        }
    }
}

/// Once the new programs are linked: copies the entries the old programs added to their
/// caches (LRU maps) after the migration's copy, without overwriting what the new programs
/// wrote since. `names`: the object's maps. Returns the entries added, by map.
pub fn top_up(dir: &Path, names: &[&str]) -> Vec<(String, u64)> {
    let mut added = Vec::new();
    for name in names {
        let (pin, aside) = (dir.join(name), aside(dir, name));
        if !exists(&aside) || !exists(&pin) {
            continue;
        }
        let (Ok(old), Ok(new)) = (MapShape::of_pin(&aside), MapShape::of_pin(&pin)) else {
            continue;
        };
        if !(old.same_layout(&new) && new.is_cache() && new.copyable()) {
            continue;
        }
        match copy_pinned(&aside, &pin, UpdateMode::OnlyNew) {
            Ok(copied) => added.push(((*name).to_owned(), copied.copied)),
            Err(error) => {
                tracing::debug!(map = %name, error = %format!("{error:#}"), "no top-up from the old map");
            }
        }
    }
    added
}

/// The capacity (max_entries) of each map in `names` pinned in `dir`, as the kernel reports it.
pub fn capacities(dir: &Path, names: &[&str]) -> BTreeMap<String, u32> {
    names
        .iter()
        .filter_map(|name| {
            let info = MapInfo::from_pin(dir.join(name)).ok()?;
            Some(((*name).to_owned(), info.max_entries()))
        })
        .collect()
}

/// How entries are written into the new map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum UpdateMode {
    /// Create or replace (`BPF_ANY`).
    Any,
    /// Only keys the map does not hold (`BPF_NOEXIST`).
    OnlyNew,
}

#[derive(Debug, Default)]
struct Copied {
    copied: u64,
    /// Entries the new map refused (full, smaller than the old one).
    dropped: u64,
    first_error: Option<String>,
}

/// Copies every entry of the map pinned at `from` into the one pinned at `to` (same layout).
fn copy_pinned(from: &Path, to: &Path, mode: UpdateMode) -> anyhow::Result<Copied> {
    let source = MapData::from_pin(from)
        .with_context(|| format!("opening the pinned map {}", from.display()))?;
    let target = MapData::from_pin(to)
        .with_context(|| format!("opening the pinned map {}", to.display()))?;
    let (old, new) = (
        MapShape::of_info(&source.info()?)?,
        MapShape::of_info(&target.info()?)?,
    );
    if !old.same_layout(&new) || !new.copyable() {
        bail!("{old} cannot be copied into {new}");
    }
    let cpus = aya::util::nr_cpus().map_err(|(path, error)| anyhow!("reading {path}: {error}"))?;
    copy_entries(source.fd().as_fd(), target.fd().as_fd(), &old, cpus, mode)
}

fn copy_entries(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    shape: &MapShape,
    possible_cpus: usize,
    mode: UpdateMode,
) -> anyhow::Result<Copied> {
    let mut copied = Copied::default();
    let mut key: Option<Vec<u8>> = None;
    let mut next = vec![0u8; shape.key_size as usize];
    let mut value = vec![0u8; shape.value_buffer_len(possible_cpus)];
    let flags = match mode {
        UpdateMode::Any => sys::BPF_ANY,
        UpdateMode::OnlyNew => sys::BPF_NOEXIST,
    };
    // A key deleted under the walk (an LRU eviction) restarts it from the first key: bound the
    // steps so a map changing under the walk cannot keep it going.
    let limit = u64::from(shape.max_entries).saturating_mul(2) + 16;
    for _ in 0..limit {
        match sys::get_next_key(from.as_raw_fd(), key.as_deref(), &mut next) {
            Ok(()) => {}
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => break,
            Err(error) => return Err(error).context("BPF_MAP_GET_NEXT_KEY"),
        }
        match sys::lookup(from.as_raw_fd(), &next, &mut value) {
            Ok(()) => match sys::update(to.as_raw_fd(), &next, &value, flags) {
                Ok(()) => copied.copied += 1,
                Err(error) if error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(error) => {
                    copied.dropped += 1;
                    copied.first_error.get_or_insert_with(|| error.to_string());
                }
            },
            // Gone between the two calls.
            Err(error) if error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(error) => return Err(error).context("BPF_MAP_LOOKUP_ELEM"),
        }
        key = Some(next.clone());
    }
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(kind: MapType, key: u32, value: u32, entries: u32, flags: u32) -> MapShape {
        MapShape {
            map_type: kind as u32,
            key_size: key,
            value_size: value,
            max_entries: entries,
            flags,
        }
    }

    #[test]
    fn the_same_shape_is_reused() {
        let wanted = shape(MapType::Hash, 8, 12, 65_536, 0);
        assert_eq!(verdict(&wanted, Some(&wanted)), Verdict::Reuse);
    }

    #[test]
    fn another_capacity_or_other_flags_carry_the_entries() {
        let wanted = shape(MapType::Hash, 8, 12, 70_000, 0);
        let smaller = shape(MapType::Hash, 8, 12, 65_536, 0);
        let bigger = shape(MapType::Hash, 8, 12, 100_000, 0);
        let no_prealloc = shape(MapType::Hash, 8, 12, 70_000, 1);
        assert_eq!(verdict(&wanted, Some(&smaller)), Verdict::Carry);
        assert_eq!(verdict(&wanted, Some(&bigger)), Verdict::Carry);
        assert_eq!(verdict(&wanted, Some(&no_prealloc)), Verdict::Carry);
        for kind in [
            MapType::LruHash,
            MapType::PerCpuHash,
            MapType::LruPerCpuHash,
            MapType::Array,
            MapType::PerCpuArray,
            MapType::LpmTrie,
        ] {
            assert_eq!(
                verdict(&shape(kind, 8, 12, 10, 0), Some(&shape(kind, 8, 12, 20, 0))),
                Verdict::Carry,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn another_layout_or_an_unreadable_pin_is_rebuilt() {
        let wanted = shape(MapType::Hash, 8, 12, 65_536, 0);
        for pinned in [
            shape(MapType::Hash, 16, 12, 65_536, 0),
            shape(MapType::Hash, 8, 16, 65_536, 0),
            shape(MapType::LruHash, 8, 12, 65_536, 0),
            shape(MapType::PerCpuHash, 8, 12, 65_536, 0),
            shape(MapType::Hash, 8, 16, 70_000, 0),
        ] {
            assert_eq!(
                verdict(&wanted, Some(&pinned)),
                Verdict::Rebuild,
                "{pinned}"
            );
        }
        assert_eq!(verdict(&wanted, None), Verdict::Rebuild);
    }

    #[test]
    fn maps_of_descriptors_are_not_copied_even_with_the_same_layout() {
        for kind in [
            MapType::ProgramArray,
            MapType::HashOfMaps,
            MapType::ArrayOfMaps,
            MapType::SockHash,
            MapType::Queue,
            MapType::RingBuf,
        ] {
            let wanted = shape(kind, 4, 4, 64, 0);
            assert_eq!(verdict(&wanted, Some(&wanted)), Verdict::Reuse, "{kind:?}");
            assert_eq!(
                verdict(&wanted, Some(&shape(kind, 4, 4, 32, 0))),
                Verdict::Rebuild,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn the_objects_shape_drops_descriptor_flags_the_kernel_does_not_keep() {
        let rdonly_no_prealloc = (1 << 3) | 1;
        let map =
            aya_obj::Map::new_from_params(MapType::Hash as u32, 8, 12, 16, rdonly_no_prealloc);
        let shape = MapShape::of_object(&map, Some(32));
        assert_eq!(shape, self::shape(MapType::Hash, 8, 12, 32, 1));
        assert_eq!(
            MapShape::of_object(&map, None).max_entries,
            16,
            "no override: the object's capacity"
        );
    }

    #[test]
    fn per_cpu_values_take_eight_byte_slots_per_possible_cpu() {
        assert_eq!(
            shape(MapType::PerCpuHash, 4, 12, 1, 0).value_buffer_len(3),
            48
        );
        assert_eq!(
            shape(MapType::LruPerCpuHash, 4, 16, 1, 0).value_buffer_len(2),
            32
        );
        assert_eq!(
            shape(MapType::PerCpuArray, 4, 1, 1, 0).value_buffer_len(4),
            32
        );
        assert_eq!(shape(MapType::Hash, 4, 12, 1, 0).value_buffer_len(3), 12);
        assert_eq!(shape(MapType::LruHash, 4, 12, 1, 0).value_buffer_len(3), 12);
    }

    #[test]
    fn only_lru_maps_are_topped_up_after_the_new_programs_are_linked() {
        assert!(shape(MapType::LruHash, 4, 4, 1, 0).is_cache());
        assert!(shape(MapType::LruPerCpuHash, 4, 4, 1, 0).is_cache());
        // The agent writes (and deletes from) these: carrying them again would bring back
        // what the first sync removed.
        assert!(!shape(MapType::Hash, 4, 4, 1, 0).is_cache());
        assert!(!shape(MapType::PerCpuHash, 4, 4, 1, 0).is_cache());
    }

    #[test]
    fn shapes_read_well_in_the_log() {
        assert_eq!(
            shape(MapType::Hash, 8, 12, 65_536, 1).to_string(),
            "Hash(key 8 B, value 12 B, 65536 entries, flags 0x1)"
        );
        let unknown = MapShape {
            map_type: 9999,
            ..shape(MapType::Hash, 8, 12, 1, 0)
        };
        assert!(unknown.to_string().starts_with("type 9999("), "{unknown}");
    }

    #[test]
    fn the_objects_pinned_maps_get_the_loaders_capacities() {
        use lb_common::{limits, map_names};
        let shapes = pinned_shapes(
            crate::dataplane::loader::EBPF_OBJECT,
            &[(map_names::FRONTENDS_V4, 70_000)],
        )
        .unwrap();
        let services = shapes[map_names::FRONTENDS_V4];
        assert_eq!(services.max_entries, 70_000);
        assert_eq!(services.kind(), Some(MapType::Hash));
        assert_eq!(
            services.key_size as usize,
            size_of::<lb_common::Frontend4Key>()
        );
        assert_eq!(
            services.value_size as usize,
            size_of::<lb_common::FrontendValue>()
        );
        assert_eq!(
            shapes[map_names::BACKENDS_V4].max_entries,
            limits::MAX_BACKENDS,
            "no override: the object's own capacity"
        );
        assert_eq!(shapes[map_names::REVNAT_V4].kind(), Some(MapType::LruHash));
        // Only maps pinned by name: not the log ring buffer nor the globals.
        assert!(
            shapes
                .keys()
                .all(|name| name.starts_with("LB4_") || name.starts_with("LB6_")),
            "{shapes:?}"
        );
    }

    /// An upgrade from the IPv4-only object: every IPv4 map keeps its name and shape (so its
    /// pin is reused, entries and all, and the reconciler adopts it), the IPv6 maps are new,
    /// and the fragment map, whose key changed, has a new name: the object does not pin
    /// `LB4_FRAGS_V1` any more, so it is left to the old programs and removed once the new
    /// ones are linked (`remove_maps_except` of the object's names).
    #[test]
    fn ipv4_pins_of_the_ipv4_only_object_are_reused_and_the_old_fragment_map_retired() {
        use lb_common::map_names::*;
        let limits = crate::dataplane::Limits::default();
        let shapes =
            pinned_shapes(crate::dataplane::loader::EBPF_OBJECT, &limits.capacities()).unwrap();
        let hash = bpf_map_type::BPF_MAP_TYPE_HASH as u32;
        let lru = bpf_map_type::BPF_MAP_TYPE_LRU_HASH as u32;
        // (name, type, key size, value size) as the IPv4-only object pinned them.
        let before = [
            (FRONTENDS_V4, hash, 8, 16),
            (BACKENDS_V4, hash, 4, 8),
            (SLOTS_V4, hash, 8, 4),
            (MAGLEV_V4, hash, 4, 4 * lb_common::MAGLEV_SIZE + 4),
            (REVNAT_V4, lru, 8, 16 * lb_common::SOCK_SERVICES as u32 + 8),
            (NODE_ADDRS_V4, hash, 4, 4),
            (IFACE_ADDRS_V4, hash, 4, 4),
        ];
        for (name, map_type, key_size, value_size) in before {
            let shape = shapes[name];
            assert_eq!(
                (shape.map_type, shape.key_size, shape.value_size),
                (map_type, key_size, value_size),
                "{name}"
            );
        }
        assert_eq!(FRAGS_V4, "LB4_FRAGS_V2");
        assert!(shapes.contains_key(FRAGS_V4), "{shapes:?}");
        assert!(!shapes.contains_key("LB4_FRAGS_V1"), "{shapes:?}");
        for name in [
            FRONTENDS_V6,
            BACKENDS_V6,
            AFFINITY_V6,
            REVNAT_V6,
            SERVICE_NAMES_V6,
            FLOWS_V6,
            FLOW_REPLIES_V6,
            SNAT_EXHAUSTED_V6,
            NODE_ADDRS_V6,
            IFACE_ADDRS_V6,
            SOURCE_RANGES_V6,
            FRAGS_V6,
        ] {
            assert!(shapes.contains_key(name), "{name} missing: {shapes:?}");
        }
        assert_eq!(shapes[FRONTENDS_V6].key_size, 20);
        assert_eq!(shapes[FRONTENDS_V6].value_size, 16);
        assert_eq!(shapes[BACKENDS_V6].value_size, 20);
        // A pin of the retired name is another map to the shape check: none is wanted under
        // that name, so nothing is moved aside or carried for it.
        let dir = Dir::new();
        dir.write("LB4_FRAGS_V1", "old fragments");
        let wanted: BTreeMap<String, MapShape> = shapes
            .iter()
            .map(|(name, shape)| (name.clone(), *shape))
            .collect();
        let moved = prepare_shapes(&wanted, &dir.0, |pin| {
            panic!("{}: no pin of a wanted name exists", pin.display())
        });
        assert!(moved.unwrap().is_empty());
        assert_eq!(dir.read("LB4_FRAGS_V1").as_deref(), Some("old fragments"));
    }

    #[test]
    fn a_whole_object_loaded_with_its_limits_has_every_shape_it_asks_for() {
        let limits = crate::dataplane::Limits::default();
        let shapes =
            pinned_shapes(crate::dataplane::loader::EBPF_OBJECT, &limits.capacities()).unwrap();
        for (name, entries) in limits.capacities() {
            assert_eq!(shapes[name].max_entries, entries, "{name}");
        }
    }

    /// A directory of plain files standing in for pins: the moves do not need bpffs.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Self {
            use std::sync::atomic::{AtomicU32, Ordering};
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "lb-migrate-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn write(&self, name: &str, contents: &str) {
            std::fs::write(self.0.join(name), contents).unwrap();
        }

        fn read(&self, name: &str) -> Option<String> {
            std::fs::read_to_string(self.0.join(name)).ok()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Pins whose contents are the capacity they were made with.
    fn read_capacity(pin: &Path) -> anyhow::Result<MapShape> {
        let entries = std::fs::read_to_string(pin)?.trim().parse()?;
        Ok(shape(MapType::Hash, 8, 12, entries, 0))
    }

    fn wanted(maps: &[(&str, u32)]) -> BTreeMap<String, MapShape> {
        maps.iter()
            .map(|(name, entries)| ((*name).to_owned(), shape(MapType::Hash, 8, 12, *entries, 0)))
            .collect()
    }

    #[test]
    fn only_pins_of_another_shape_are_moved_aside() {
        let dir = Dir::new();
        dir.write("SAME", "16");
        dir.write("GROWN", "16");
        dir.write("BROKEN", "not a map");
        let migration = prepare_shapes(
            &wanted(&[("SAME", 16), ("GROWN", 32), ("BROKEN", 16), ("NEW", 16)]),
            &dir.0,
            read_capacity,
        )
        .unwrap();

        assert_eq!(dir.read("SAME").as_deref(), Some("16"));
        assert_eq!(dir.read("GROWN"), None);
        assert_eq!(dir.read("GROWN-old").as_deref(), Some("16"));
        assert_eq!(dir.read("BROKEN-old").as_deref(), Some("not a map"));
        assert_eq!(dir.read("NEW-old"), None);
        let verdicts: Vec<_> = migration
            .moved
            .iter()
            .map(|m| (m.name.as_str(), m.verdict))
            .collect();
        assert_eq!(
            verdicts,
            [("BROKEN", Verdict::Rebuild), ("GROWN", Verdict::Carry)]
        );
    }

    #[test]
    fn a_failed_load_puts_the_old_pins_back() {
        let dir = Dir::new();
        dir.write("GROWN", "16");
        let migration = prepare_shapes(&wanted(&[("GROWN", 32)]), &dir.0, read_capacity).unwrap();
        // The loader created the new map before failing on another one.
        dir.write("GROWN", "32");

        let outcome: Result<(), &str> = migration.complete(Err("no memory"));

        assert_eq!(outcome, Err("no memory"));
        assert_eq!(dir.read("GROWN").as_deref(), Some("16"));
        assert_eq!(dir.read("GROWN-old"), None);
    }

    #[test]
    fn an_interrupted_start_is_picked_up_where_it_stopped() {
        // Moved aside, then the agent died before loading: the old map is put back and
        // compared again.
        let dir = Dir::new();
        dir.write("GROWN-old", "16");
        let migration = prepare_shapes(&wanted(&[("GROWN", 32)]), &dir.0, read_capacity).unwrap();
        assert_eq!(dir.read("GROWN-old").as_deref(), Some("16"));
        assert_eq!(migration.moved.len(), 1);

        // Moved aside and loaded, but the programs never linked: the map pinned now (the
        // newer one) is the one compared, and the stale one goes.
        let dir = Dir::new();
        dir.write("GROWN-old", "8");
        dir.write("GROWN", "16");
        let migration = prepare_shapes(&wanted(&[("GROWN", 32)]), &dir.0, read_capacity).unwrap();
        assert_eq!(dir.read("GROWN-old").as_deref(), Some("16"));
        assert_eq!(migration.moved[0].old.unwrap().max_entries, 16);

        // The same, and this start wants that newer shape: reused, and the stale pin waits
        // for the programs to be linked (then it is removed with the other stale pins).
        let dir = Dir::new();
        dir.write("GROWN-old", "16");
        dir.write("GROWN", "32");
        let migration = prepare_shapes(&wanted(&[("GROWN", 32)]), &dir.0, read_capacity).unwrap();
        assert!(migration.is_empty());
        assert_eq!(dir.read("GROWN").as_deref(), Some("32"));
        assert_eq!(dir.read("GROWN-old").as_deref(), Some("16"));
    }
}
