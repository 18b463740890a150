//! Replays the kept fuzz corpus (`fuzz/corpus/<target>/`: minimized finds of `cargo xtask
//! fuzz-inputs`, the repository's manifests, and every input that once crashed a target)
//! through the fuzz targets' bodies, on stable: a regression of a fixed crash fails here.
use std::path::PathBuf;

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();
    inputs.sort();
    assert!(
        inputs.len() >= 4,
        "{}: the corpus is missing",
        dir.display()
    );
    inputs
}

fn replay(target: &str, body: fn(&[u8])) {
    for (path, bytes) in corpus(target) {
        if let Err(panic) = std::panic::catch_unwind(|| body(&bytes)) {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            panic!("{target}: {} fails: {message}", path.display());
        }
    }
}

#[test]
fn manifest_corpus_replays_without_a_panic() {
    replay("manifest", lb_agent::fuzzing::manifest);
}

#[test]
fn model_corpus_replays_without_a_panic() {
    replay("model", lb_agent::fuzzing::model);
}
