//! Watching the manifest directory: inotify events that end a change wake a read of it (see
//! [`ManifestCache::read`]), with a slow poll as a backstop.
//!
//! The `inotify` crate directly, read on the runtime (no thread of its own), with a mask of
//! only the events that can end a change: `notify`'s watcher also asks for every open and
//! write, so each read of the directory by the agent itself, and each write of a file being
//! written, woke its thread (several wake-ups per change, a quarter of a change's CPU). Every
//! directory the last read listed is watched; hidden ones (a ConfigMap's timestamped
//! directories) are not walked, and their swap into place is a rename in a watched one.
use std::{
    collections::HashMap,
    ffi::OsStr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use futures::{FutureExt as _, StreamExt as _};
use inotify::{EventMask, EventStream, Inotify, WatchDescriptor, WatchMask};

use super::{ManifestCache, walk};
use crate::source::DeltaSender;

/// A re-read even without inotify events (network filesystems, missed events, a directory
/// created between its listing and its watch).
const POLL: Duration = Duration::from_secs(2);

/// What is watched in each directory: what can end a change, nothing about reads or writes
/// still under way.
const MASK: WatchMask = WatchMask::CREATE
    .union(WatchMask::DELETE)
    .union(WatchMask::CLOSE_WRITE)
    .union(WatchMask::MOVED_FROM)
    .union(WatchMask::MOVED_TO)
    .union(WatchMask::ATTRIB)
    .union(WatchMask::DELETE_SELF)
    .union(WatchMask::MOVE_SELF)
    .union(WatchMask::ONLYDIR);

/// Watches `dir` and publishes a delta whenever what it holds changes, until the receiver
/// is gone. A delta's `changed_at` is when the change was noticed. A change is read at once:
/// only events that end a change (a file closed after writing, renamed into place, removed)
/// wake the source, so a file being written is not read half-way, and nothing waits for a
/// quiet period. Events that arrive while a read runs are taken together by the next one.
pub async fn watch(dir: PathBuf, max_file_bytes: u64, deltas: DeltaSender) -> anyhow::Result<()> {
    let mut watcher = match Watcher::new() {
        Ok(watcher) => Some(watcher),
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the manifest directory; polling every {POLL:?}");
            None
        }
    };
    let mut cache = ManifestCache::new(max_file_bytes);
    let mut noticed_at = Instant::now();
    let mut warned = false;
    loop {
        if let Some(mut delta) = cache.read(&dir) {
            delta.changed_at = noticed_at;
            if deltas.send(delta).is_err() {
                return Ok(());
            }
        }
        if let Some(w) = &mut watcher
            && let Err(error) = w.cover(&dir, cache.directories())
            && !std::mem::replace(&mut warned, true)
        {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch the manifest directory; polling every {POLL:?} (said once)");
        }
        tokio::select! {
            ended = next_change(&mut watcher) => {
                noticed_at = Instant::now();
                if let Err(error) = ended {
                    tracing::warn!(dir = %dir.display(), %error, "reading inotify events failed; polling every {POLL:?}");
                    watcher = None;
                }
            }
            _ = tokio::time::sleep(POLL) => noticed_at = Instant::now(),
            () = deltas.closed() => return Ok(()),
        }
    }
}

/// The inotify instance and the directories it watches.
struct Watcher {
    events: EventStream<Vec<u8>>,
    /// The directory of each watch, to tell a new symlink from a new file.
    dirs: HashMap<WatchDescriptor, PathBuf>,
}

impl Watcher {
    fn new() -> std::io::Result<Self> {
        let events = Inotify::init()?.into_event_stream(vec![0u8; 16 * 1024])?;
        Ok(Self {
            events,
            dirs: HashMap::new(),
        })
    }

    /// Watches `dir` and each of `listed` (adding a watch again is a no-op for the kernel:
    /// the same descriptor; a directory replaced under the same path gets a new one).
    fn cover(&mut self, dir: &Path, listed: &[PathBuf]) -> std::io::Result<()> {
        let mut first_error = None;
        for path in std::iter::once(dir).chain(listed.iter().map(PathBuf::as_path)) {
            match self.events.watches().add(path, MASK) {
                Ok(wd) => {
                    if self.dirs.get(&wd).is_none_or(|known| known != path) {
                        self.dirs.insert(wd, path.to_owned());
                    }
                }
                // Gone since the walk: its parent's event brings the next read.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Waits for an event that ends a change, then takes every event already queued with it.
/// Never returns without a watcher (the poll does the work then).
async fn next_change(watcher: &mut Option<Watcher>) -> std::io::Result<()> {
    let Some(w) = watcher else {
        return std::future::pending().await;
    };
    loop {
        let Some(event) = w.events.next().await else {
            return Err(std::io::Error::other("the inotify stream ended"));
        };
        if w.ends_a_change(&event?) {
            break;
        }
    }
    while let Some(Some(event)) = w.events.next().now_or_never() {
        w.ends_a_change(&event?);
    }
    Ok(())
}

impl Watcher {
    /// Whether `event` ends a change; a watch the kernel dropped (its directory gone) is
    /// forgotten.
    fn ends_a_change(&mut self, event: &inotify::Event<std::ffi::OsString>) -> bool {
        if event.mask.contains(EventMask::IGNORED) {
            self.dirs.remove(&event.wd);
        }
        let dir = self.dirs.get(&event.wd).map(PathBuf::as_path);
        ends_a_change(event.mask, event.name.as_deref(), dir)
    }
}

/// Whether an event ends a change to what the directory holds: a file closed after writing
/// (not a hidden one: the walk skips it, and a temporary file written then renamed into place
/// ends its change with the rename), anything renamed or removed (`mv` into place, a
/// ConfigMap's `..data` swap), a new directory or symlink, a changed attribute (a `touch`, a
/// permission now letting the agent read), a watched directory gone or moved, lost events;
/// not a new regular file (its close follows). `name` is the entry's name in `dir`, the
/// watched directory the event is from.
fn ends_a_change(mask: EventMask, name: Option<&OsStr>, dir: Option<&Path>) -> bool {
    if mask.contains(EventMask::CLOSE_WRITE) {
        return !name.is_some_and(walk::is_hidden);
    }
    if mask.contains(EventMask::CREATE) && !mask.contains(EventMask::ISDIR) {
        return match (dir, name) {
            (Some(dir), Some(name)) => dir
                .join(name)
                .symlink_metadata()
                .is_ok_and(|m| m.is_symlink()),
            _ => true,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use std::{ffi::OsStr, path::Path};

    use inotify::EventMask;

    use super::ends_a_change;

    #[test]
    fn a_hidden_temporary_file_ends_its_change_with_the_rename_not_its_close() {
        let dir = Some(Path::new("/nonexistent-manifests"));
        let name = |n: &'static str| Some(OsStr::new(n));
        assert!(!ends_a_change(
            EventMask::CLOSE_WRITE,
            name(".one.json.tmp"),
            dir
        ));
        assert!(ends_a_change(EventMask::CLOSE_WRITE, name("one.json"), dir));
        assert!(ends_a_change(
            EventMask::MOVED_FROM,
            name(".one.json.tmp"),
            dir
        ));
        assert!(ends_a_change(EventMask::MOVED_TO, name("one.json"), dir));
        // A ConfigMap's swap renames a hidden symlink into place: a change.
        assert!(ends_a_change(EventMask::MOVED_TO, name("..data"), dir));
        // A new regular file's close follows; a new directory is a change now.
        assert!(!ends_a_change(EventMask::CREATE, name("two.yaml"), dir));
        assert!(ends_a_change(
            EventMask::CREATE | EventMask::ISDIR,
            name("more"),
            dir
        ));
        assert!(ends_a_change(EventMask::Q_OVERFLOW, None, None));
    }

    #[test]
    fn a_new_symlink_ends_a_change_when_it_is_made() {
        let dir = std::env::temp_dir().join(format!("lb-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("real.yaml"), "").unwrap();
        let _ = std::fs::remove_file(dir.join("link.yaml"));
        std::os::unix::fs::symlink("real.yaml", dir.join("link.yaml")).unwrap();
        let name = |n: &'static str| Some(OsStr::new(n));
        let symlink = ends_a_change(EventMask::CREATE, name("link.yaml"), Some(&dir));
        let file = ends_a_change(EventMask::CREATE, name("real.yaml"), Some(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(symlink && !file);
    }
}
