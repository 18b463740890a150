//! Watching the manifest directory: inotify events that end a change wake a read of it (see
//! [`ManifestCache::read`]), with a slow poll as a backstop.
use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use notify::Watcher as _;
use tokio::sync::mpsc;

use super::{ManifestCache, walk};
use crate::source::DeltaSender;

/// A re-read even without inotify events (network filesystems, missed events).
const POLL: Duration = Duration::from_secs(2);

/// Watches `dir` and publishes a delta whenever what it holds changes, until the receiver
/// is gone. A delta's `changed_at` is when the change was noticed. A change is read at once:
/// only events that end a change (a file closed after writing, renamed into place, removed)
/// wake the source, so a file being written is not read half-way, and nothing waits for a
/// quiet period. Events that arrive while a read runs are taken together by the next one.
pub async fn watch(dir: PathBuf, max_file_bytes: u64, deltas: DeltaSender) -> anyhow::Result<()> {
    let (events_tx, mut events) = mpsc::unbounded_channel();
    // Symlinked directories are not walked, so not watched either.
    let mut watcher = notify::RecommendedWatcher::new(
        move |event: notify::Result<notify::Event>| {
            if event.as_ref().map_or(true, ends_a_change) {
                let _ = events_tx.send(());
            }
        },
        notify::Config::default().with_follow_symlinks(false),
    )?;
    if let Err(error) = watcher.watch(&dir, notify::RecursiveMode::Recursive) {
        tracing::warn!(dir = %dir.display(), %error, "cannot watch the manifest directory; polling every {POLL:?}");
    }
    let mut cache = ManifestCache::new(max_file_bytes);
    let mut noticed_at = Instant::now();
    loop {
        if let Some(mut delta) = cache.read(&dir) {
            delta.changed_at = noticed_at;
            if deltas.send(delta).is_err() {
                return Ok(());
            }
        }
        tokio::select! {
            _ = events.recv() => {
                noticed_at = Instant::now();
                while events.try_recv().is_ok() {}
            }
            _ = tokio::time::sleep(POLL) => noticed_at = Instant::now(),
            () = deltas.closed() => return Ok(()),
        }
    }
}

/// Whether an event ends a change to what the directory holds: a file closed after writing
/// (not a hidden one: the walk skips it, and a temporary file written then renamed into place
/// ends its change with the rename), anything renamed or removed (`mv` into place, a
/// ConfigMap's `..data` swap), a new directory or symlink, a changed attribute (a `touch`, a
/// permission now letting the agent read); not a new regular file nor its writes while it is
/// open (its close follows), nor reads.
fn ends_a_change(event: &notify::Event) -> bool {
    use notify::event::{AccessKind, AccessMode, CreateKind, EventKind, ModifyKind};
    let hidden = |path: &PathBuf| path.file_name().is_some_and(walk::is_hidden);
    match event.kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => !event.paths.iter().all(hidden),
        EventKind::Access(_) | EventKind::Modify(ModifyKind::Data(_)) => false,
        EventKind::Create(CreateKind::File) => event
            .paths
            .iter()
            .any(|path| path.symlink_metadata().is_ok_and(|m| m.is_symlink())),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    #[test]
    fn a_hidden_temporary_file_ends_its_change_with_the_rename_not_its_close() {
        use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
        let dir = Path::new("/manifests");
        let event = |kind, paths: &[&str]| {
            let event = notify::Event::new(kind);
            paths.iter().fold(event, |e, p| e.add_path(dir.join(p)))
        };
        let closed = EventKind::Access(AccessKind::Close(AccessMode::Write));
        assert!(!super::ends_a_change(&event(closed, &[".one.json.tmp"])));
        assert!(super::ends_a_change(&event(closed, &["one.json"])));
        let renamed = EventKind::Modify(ModifyKind::Name(RenameMode::Both));
        assert!(super::ends_a_change(&event(
            renamed,
            &[".one.json.tmp", "one.json"]
        )));
        // A ConfigMap's swap renames a hidden symlink into place: a change.
        assert!(super::ends_a_change(&event(
            renamed,
            &["..data_tmp", "..data"]
        )));
    }
}
