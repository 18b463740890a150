//! Service and backend selection, shared by every attach point.
use aya_ebpf::helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use lb_common::{
    Affinity4Key, Affinity4Value, Backend4, Service4Key, Service4Value, Slot4Key, service_flags,
};

use crate::maps::{LB4_AFFINITY, LB4_BACKENDS, LB4_SERVICES, LB4_SLOTS, LB4_SVC_STATS};

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// What the data path should do with a connection to a given address.
pub enum Verdict {
    /// Not a service address: leave it alone.
    NotAService,
    /// A service with no usable backend: refuse the connection.
    NoBackend,
    /// Send it to this backend.
    Backend(Backend4),
}

/// Copy of the service entry for `key`, if it is a service.
#[inline(always)]
fn service(key: &Service4Key) -> Option<Service4Value> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { LB4_SERVICES.get(key) }.copied()
}

#[inline(always)]
fn backend(backend_id: u32) -> Option<Backend4> {
    // SAFETY: copied out at once, as above.
    unsafe { LB4_BACKENDS.get(backend_id) }.copied()
}

/// A backend of the live generation, chosen uniformly at random.
#[inline(always)]
fn random_backend(svc: &Service4Value) -> Option<(u32, Backend4)> {
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = Slot4Key {
        service_id: svc.service_id,
        index: (random % svc.count as u32) as u16,
        generation: svc.generation,
        pad: 0,
    };
    // SAFETY: copied out at once, as above.
    let backend_id = unsafe { LB4_SLOTS.get(slot) }?.backend_id;
    Some((backend_id, backend(backend_id)?))
}

/// Picks the backend for a connection from client `client_cookie` (its network namespace) to
/// the service at `key`. A service that changes while we read it (the agent switching slot
/// generations) is read once more; if it still does not resolve, the service has no backend.
#[inline(always)]
pub fn select(key: &Service4Key, client_cookie: u64) -> Verdict {
    let Some(svc) = service(key) else {
        return Verdict::NotAService;
    };
    let verdict = choose(key, svc, client_cookie);
    count(svc.service_id, &verdict);
    verdict
}

/// Per-CPU counters: no atomics, no sharing between CPUs; the agent sums them.
#[inline(always)]
fn count(service_id: u32, verdict: &Verdict) {
    if let Some(stats) = LB4_SVC_STATS.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU value, written only by programs running on this CPU.
        unsafe {
            match verdict {
                Verdict::Backend(_) => (*stats).forwarded += 1,
                Verdict::NoBackend => (*stats).refused += 1,
                Verdict::NotAService => {}
            }
        }
    }
}

#[inline(always)]
fn choose(key: &Service4Key, mut svc: Service4Value, client_cookie: u64) -> Verdict {
    for _attempt in 0..2 {
        if svc.count == 0 {
            return Verdict::NoBackend;
        }
        let chosen = if svc.flags & service_flags::AFFINITY != 0 {
            with_affinity(&svc, client_cookie)
        } else {
            random_backend(&svc).map(|(_, b)| b)
        };
        if let Some(backend) = chosen {
            return Verdict::Backend(backend);
        }
        match service(key) {
            Some(again) => svc = again,
            None => return Verdict::NotAService,
        }
    }
    Verdict::NoBackend
}

/// Session affinity: the backend this client used last, unless the entry timed out or that
/// backend was removed; otherwise a random one, remembered for next time.
#[inline(always)]
fn with_affinity(svc: &Service4Value, client_cookie: u64) -> Option<Backend4> {
    let key = Affinity4Key {
        client_cookie,
        service_id: svc.service_id,
        pad: 0,
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let timeout = svc.affinity_timeout_secs as u64 * NANOS_PER_SEC;
    // SAFETY: copied out at once, as above.
    let remembered = unsafe { LB4_AFFINITY.get(key) }.copied();
    let (backend_id, chosen) = match remembered
        .filter(|entry| now.wrapping_sub(entry.last_used_ns) <= timeout)
        .and_then(|entry| backend(entry.backend_id).map(|b| (entry.backend_id, b)))
    {
        Some(found) => found,
        None => random_backend(svc)?,
    };
    let entry = Affinity4Value {
        last_used_ns: now,
        backend_id,
        pad: 0,
    };
    // A full LRU map evicts the oldest client; failure only costs affinity, not the connection.
    let _ = LB4_AFFINITY.insert(key, entry, 0);
    Some(chosen)
}
