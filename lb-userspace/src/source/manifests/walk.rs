//! Listing the manifest directory. The rules:
//! - hidden entries (a leading `.`) and files without a manifest extension are skipped;
//! - symlinks to files are followed; symlinks to directories are not (logged at debug level),
//!   so a `dir -> .` loop cannot make a file be read many times;
//! - a directory seen twice by (device, inode) (a bind mount of a parent) is walked once;
//! - an entry that cannot be looked at (a dangling or looping symlink) is reported by name;
//! - which directories were listed completely is kept, so the caller can tell a file that
//!   is really gone (its directory was listed without it) from one a failed listing missed.
use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    ffi::{OsStr, OsString},
    fs::Metadata,
    path::{Path, PathBuf},
};

/// Files with these extensions are read; others (READMEs, editor backups) are ignored.
const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// What one walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// The manifest files, sorted, each with what `stat` (following symlinks) said.
    pub files: Vec<(PathBuf, Metadata)>,
    /// Every directory whose listing completed, with the names in it that the walk took
    /// (files and directories apart).
    pub listed: BTreeMap<PathBuf, Listed>,
    /// Manifest files that could not be looked at (dangling symlinks and the like), with why.
    pub unreadable: Vec<(PathBuf, std::io::Error)>,
    /// Directories that could not be listed, or only in part.
    pub problems: Vec<String>,
}

/// The entries of one completely listed directory that the walk took.
#[derive(Debug, Default)]
pub struct Listed {
    pub files: BTreeSet<OsString>,
    pub dirs: BTreeSet<OsString>,
}

impl Walk {
    /// Whether `file`, not found by this walk, is known to be gone: the nearest of its
    /// directories that was listed completely did not hold it (or the directory on the way
    /// to it). A file under a directory that could not be listed is not known to be gone.
    pub fn is_gone(&self, file: &Path) -> bool {
        let mut child = file;
        let mut is_file = true;
        while let Some(parent) = child.parent() {
            if let (Some(listed), Some(name)) = (self.listed.get(parent), child.file_name()) {
                let names = if is_file { &listed.files } else { &listed.dirs };
                return !names.contains(name);
            }
            child = parent;
            is_file = false;
        }
        false
    }
}

fn is_manifest(path: &Path) -> bool {
    path.extension()
        .is_some_and(|ext| EXTENSIONS.iter().any(|e| ext == *e))
}

/// Walks `dir`; never fails: what cannot be listed is in [`Walk::problems`]. `fault` says
/// which listings fail on purpose (tests inject failures with it; the agent passes none).
pub fn walk(dir: &Path, fault: &super::Fault) -> Walk {
    use std::os::unix::fs::MetadataExt as _;
    let mut walk = Walk::default();
    let mut seen_dirs = HashSet::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        match std::fs::metadata(&current) {
            Ok(meta) if !seen_dirs.insert((meta.dev(), meta.ino())) => {
                tracing::debug!(dir = %current.display(), "directory already walked (same device and inode); skipped");
                continue;
            }
            _ => {}
        }
        let listing = match fault(&current) {
            Some(error) => Err(error),
            None => std::fs::read_dir(&current),
        };
        let entries = match listing {
            Ok(entries) => entries,
            Err(error) => {
                walk.problems.push(format!(
                    "{}: cannot list the directory: {error}; the objects of its files are kept as last read",
                    current.display()
                ));
                continue;
            }
        };
        let mut listed = Listed::default();
        let mut complete = true;
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    walk.problems.push(format!(
                        "{}: listing the directory failed part way: {error}; the objects of its files are kept as last read",
                        current.display()
                    ));
                    complete = false;
                    break;
                }
            };
            let name = entry.file_name();
            if is_hidden(&name) {
                continue;
            }
            let path = entry.path();
            let Ok(file_type) = entry.file_type() else {
                // The entry went between listing and looking: as if it was not listed.
                continue;
            };
            if file_type.is_dir() {
                listed.dirs.insert(name);
                pending.push(path);
                continue;
            }
            let manifest = is_manifest(&path);
            if !manifest && !file_type.is_symlink() {
                continue;
            }
            // A symlink or a plain file: what it points at decides.
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_dir() => {
                    tracing::debug!(path = %path.display(), "a symlink to a directory: not followed");
                }
                Ok(meta) if manifest => {
                    listed.files.insert(name);
                    walk.files.push((path, meta));
                }
                Ok(_) => {}
                // A plain file removed since the listing: as if it was not listed.
                Err(error)
                    if !file_type.is_symlink() && error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) if manifest => {
                    listed.files.insert(name);
                    walk.unreadable.push((path, error));
                }
                Err(_) => {}
            }
        }
        if complete {
            walk.listed.insert(current, listed);
        }
    }
    walk.files.sort_by(|a, b| a.0.cmp(&b.0));
    // Two symlinks to one file (or a symlink and the file): read once, by its first path.
    let mut seen_files = HashSet::new();
    let listed = &mut walk.listed;
    walk.files.retain(|(path, meta)| {
        let first = seen_files.insert((meta.dev(), meta.ino()));
        if !first {
            tracing::debug!(path = %path.display(), "the same file as an earlier path: read once");
            if let (Some(parent), Some(name)) = (path.parent(), path.file_name())
                && let Some(names) = listed.get_mut(parent)
            {
                names.files.remove(name);
            }
        }
        first
    });
    walk.unreadable.sort_by(|a, b| a.0.cmp(&b.0));
    walk
}

/// A hidden entry (a leading `.`): never walked.
pub fn is_hidden(name: &OsStr) -> bool {
    name.as_encoded_bytes().starts_with(b".")
}
