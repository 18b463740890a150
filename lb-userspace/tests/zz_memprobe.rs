use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicIsize, Ordering},
};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        LIVE.fetch_add(n as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}
#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

#[test]
fn probe() {
    use lb_agent::{model, reconcile, source::manifests::ManifestCache};
    let n = 20_000f64;
    let dir = std::path::Path::new("/tmp/probe");
    let t0 = live();
    let mut cache = ManifestCache::new(1 << 30);
    let delta = cache.read(dir).unwrap();
    let t1 = live();
    let mut m = model::Model::new(model::ProxyIdentity {
        node_name: "bench-node".into(),
        service_proxy_name: None,
    });
    m.apply(&delta.objects);
    let t2 = live();
    let origins = delta.origins.clone();
    let t2b = live();
    drop(origins);
    drop(delta);
    let t3 = live();
    let mut maps = reconcile::memory::MemoryMaps::default();
    let t4 = live();
    let mut r = reconcile::Reconciler::default();
    r.sync(m.desired(), &mut maps);
    let t5 = live();
    drop(maps);
    let t6 = live();
    eprintln!("per service: cache+delta {:.0} B, model (beyond shared objects) {:.0} B, origins {:.0} B, after delta dropped: cache+model {:.0} B; reconciler+maps {:.0}, maps {:.0}, reconciler {:.0}",
        (t1 - t0) as f64 / n, (t2 - t1) as f64 / n, (t2b - t2) as f64 / n, (t3 - t0) as f64 / n, (t5 - t4) as f64 / n, (t5 - t6) as f64 / n, (t6 - t4) as f64 / n);
    let desired = m.desired().clone();
    let t7 = live();
    eprintln!("desired state clone: {:.0} B", (t7 - t6) as f64 / n);
    drop(desired);
    drop(m);
    let t8 = live();
    eprintln!("cache alone {:.0} B (model dropped)", (t8 - t0 - (t6 - t4)) as f64 / n);
    drop(r);
    drop(cache);
}
