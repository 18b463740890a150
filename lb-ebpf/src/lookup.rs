//! The one service table, read by every attach point: frontend lookup, backends, session
//! affinity and per-service counters. The socket programs pick a slot at random (`select`),
//! XDP through the service's Maglev table (`xdp.rs`); both remember affinity here. Written
//! once for both address families (`F: Family`): frontends, backends, affinity, source ranges
//! and node addresses are the family's maps, slots and counters are shared.
use aya_ebpf::{
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};
use lb_common::{
    AffinityKey, AffinityValue, Backend, FrontendKey, FrontendValue, MapAddr, NANOS_PER_SEC,
    SlotKey, SourceRangeKey, affinity_clients, backend_states, frontend_flags, frontend_kinds,
    scopes, source_range::SERVICE_ID_BITS,
};

use crate::{
    family::Family,
    maps::{LB4_SLOTS_V2, LB4_STATS_V2},
    netns,
};

/// What the socket programs should do with a connection to a given address.
pub enum Verdict<A> {
    /// Not a service address: leave it alone.
    NotAService,
    /// A service with no usable backend: refuse the connection.
    NoBackend,
    /// A LoadBalancer IP whose `loadBalancerSourceRanges` leave this client out.
    Filtered,
    /// Send it to this backend (its id, its value); `kept`: the one the socket used before.
    Backend {
        id: u32,
        backend: Backend<A>,
        kept: bool,
    },
}

/// Copy of the frontend entry for `key`.
#[inline(always)]
pub fn frontend<F: Family>(key: &FrontendKey<F::Addr>) -> Option<FrontendValue> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { F::frontends().get(key) }.copied()
}

#[inline(always)]
pub fn backend<F: Family>(backend_id: u32) -> Option<Backend<F::Addr>> {
    // SAFETY: copied out at once, as above.
    unsafe { F::backends().get(backend_id) }.copied()
}

/// Whether `client` (network byte order) is in the source ranges of `service_id`.
#[inline(always)]
pub fn source_allowed<F: Family>(service_id: u32, client: F::Addr) -> bool {
    let key = Key::new(
        SERVICE_ID_BITS + F::Addr::BITS,
        SourceRangeKey::new(service_id, client),
    );
    F::source_ranges().get(&key).is_some()
}

/// A pod or host process connecting at the socket.
pub struct InNodeClient<A> {
    /// Its network namespace cookie.
    pub netns_cookie: u64,
    /// The source address its socket is bound to (or a datagram names), network byte order;
    /// 0 while the kernel has not picked one (it does after routing, past these hooks).
    pub source: A,
}

impl<A: MapAddr> InNodeClient<A> {
    /// Whether the client may reach `found`, an external-scope entry. With no source known
    /// yet, the agent's answer for the node itself (a client in the node's network
    /// namespace) or for this node's pods (any other) stands in for the lookup.
    #[inline(always)]
    fn allowed<F: Family<Addr = A>>(&self, found: &FrontendValue) -> bool {
        if found.flags & frontend_flags::SOURCE_RANGES == 0 {
            return true;
        }
        if !self.source.is_zero() {
            return source_allowed::<F>(found.service_id, self.source);
        }
        let stand_in = if netns::is_node(self.netns_cookie) {
            frontend_flags::RANGES_ALLOW_NODE
        } else {
            frontend_flags::RANGES_ALLOW_PODS
        };
        found.flags & stand_in != 0
    }
}

/// What an in-node client reaches at an address.
enum Reached {
    Frontend(FrontendValue),
    /// A frontend this client may not use (source ranges), by its service id.
    Filtered(u32),
}

/// The frontend an in-node client (a pod or a host process, at the socket) reaches at `key`:
/// a ClusterIP, externalIP or LoadBalancer IP by its address, a NodePort at one of the node's
/// NodePort addresses (`LB4_NODEADDR`, which the agent fills with the node's addresses and
/// 127.0.0.1), and the internal-scope entry where the frontend has two. Address 0 itself is
/// no address a socket connects to a NodePort at. Source ranges are checked on the frontend's
/// own (external-scope) entry.
#[inline(always)]
fn in_node_frontend<F: Family>(
    key: &FrontendKey<F::Addr>,
    client: &InNodeClient<F::Addr>,
) -> Option<Reached> {
    let (key, found) = match frontend::<F>(key) {
        Some(found) if found.kind == frontend_kinds::NODE_PORT => return None,
        Some(found) => (*key, found),
        None => {
            // SAFETY: only tested for presence.
            unsafe { F::node_addrs().get(&key.addr) }?;
            let node_port = FrontendKey {
                addr: F::Addr::ZERO,
                ..*key
            };
            let found =
                frontend::<F>(&node_port).filter(|f| f.kind == frontend_kinds::NODE_PORT)?;
            (node_port, found)
        }
    };
    if !client.allowed::<F>(&found) {
        return Some(Reached::Filtered(found.service_id));
    }
    if found.flags & frontend_flags::TWO_SCOPES != 0 {
        let internal = FrontendKey {
            scope: scopes::INTERNAL,
            ..key
        };
        return Some(Reached::Frontend(frontend::<F>(&internal).unwrap_or(found)));
    }
    Some(Reached::Frontend(found))
}

/// A backend of the live generation, chosen uniformly at random.
#[inline(always)]
fn random_backend<F: Family>(svc: &FrontendValue) -> Option<(u32, Backend<F::Addr>)> {
    // SAFETY: a helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    let slot = SlotKey {
        service_id: svc.service_id,
        index: (random % svc.count as u32) as u16,
        generation: svc.generation,
        pad: 0,
    };
    // SAFETY: copied out at once, as above.
    let backend_id = unsafe { LB4_SLOTS_V2.get(slot) }?.backend_id;
    Some((backend_id, backend::<F>(backend_id)?))
}

/// Picks the backend for a connection from an in-node client to the frontend at `key`
/// (scope external; the program never names the scope): `preferred()` (the backend this
/// socket used for this frontend before, asked only once `key` is known to be a service)
/// while it exists, else by session affinity or at random. A service that changes while we
/// read it (the agent switching slot generations) is read once more; if it still does not
/// resolve, the service has no backend.
#[inline(always)]
pub fn select<F: Family>(
    key: &FrontendKey<F::Addr>,
    client: &InNodeClient<F::Addr>,
    preferred: impl FnOnce() -> Option<u32>,
) -> Verdict<F::Addr> {
    let svc = match in_node_frontend::<F>(key, client) {
        None => return Verdict::NotAService,
        Some(Reached::Filtered(service_id)) => {
            count(service_id, false);
            return Verdict::Filtered;
        }
        Some(Reached::Frontend(svc)) => svc,
    };
    let kept = if svc.count > 0 {
        preferred().and_then(|id| Some((id, backend::<F>(id)?)))
    } else {
        None
    };
    let verdict = match kept {
        Some((id, backend)) => Verdict::Backend {
            id,
            backend,
            kept: true,
        },
        None => choose::<F>(key, svc, client),
    };
    count(svc.service_id, matches!(verdict, Verdict::Backend { .. }));
    verdict
}

/// Per-CPU counters: no atomics, no sharing between CPUs; the agent sums them.
#[inline(always)]
pub fn count(service_id: u32, forwarded: bool) {
    if let Some(stats) = LB4_STATS_V2.get_ptr_mut(service_id) {
        // SAFETY: a per-CPU value, written only by programs running on this CPU.
        unsafe {
            if forwarded {
                (*stats).forwarded += 1;
            } else {
                (*stats).refused += 1;
            }
        }
    }
}

#[inline(always)]
fn choose<F: Family>(
    key: &FrontendKey<F::Addr>,
    mut svc: FrontendValue,
    client: &InNodeClient<F::Addr>,
) -> Verdict<F::Addr> {
    for _attempt in 0..2 {
        if svc.count == 0 {
            return Verdict::NoBackend;
        }
        let chosen = if svc.flags & frontend_flags::AFFINITY != 0 {
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            let remembered = AffinityClient::<F>::cookie(client.netns_cookie, svc.service_id);
            match remembered.remembered(&svc, now) {
                Some(found) => Some(found),
                None => random_backend::<F>(&svc).inspect(|(id, _)| remembered.remember(*id, now)),
            }
        } else {
            random_backend::<F>(&svc)
        };
        if let Some((id, backend)) = chosen {
            return Verdict::Backend {
                id,
                backend,
                kept: false,
            };
        }
        match in_node_frontend::<F>(key, client) {
            Some(Reached::Frontend(again)) => svc = again,
            Some(Reached::Filtered(_)) => return Verdict::Filtered,
            None => return Verdict::NotAService,
        }
    }
    Verdict::NoBackend
}

/// One client of one service, as the affinity map of family `F` keys it.
pub struct AffinityClient<F: Family> {
    key: AffinityKey<F::Addr>,
}

impl<F: Family> AffinityClient<F> {
    /// A pod or host process, by its network namespace cookie.
    #[inline(always)]
    pub fn cookie(cookie: u64, service_id: u32) -> Self {
        Self::new(
            F::Addr::client_of_cookie(cookie),
            affinity_clients::NETNS_COOKIE,
            service_id,
        )
    }

    /// An outside client, by its address (network byte order).
    #[inline(always)]
    pub fn address(addr: F::Addr, service_id: u32) -> Self {
        Self::new(addr.client_of_addr(), affinity_clients::ADDRESS, service_id)
    }

    #[inline(always)]
    fn new(client: <F::Addr as MapAddr>::Client, client_kind: u8, service_id: u32) -> Self {
        Self {
            key: AffinityKey {
                client,
                service_id,
                client_kind,
                pad: [0; 3],
            },
        }
    }

    /// The backend this client used last, unless the entry timed out or that backend was
    /// removed or is terminating; refreshed when found.
    #[inline(always)]
    pub fn remembered(&self, svc: &FrontendValue, now: u64) -> Option<(u32, Backend<F::Addr>)> {
        // SAFETY: copied out at once.
        let entry = unsafe { F::affinity().get(&self.key) }.copied()?;
        let timeout = svc.affinity_timeout_secs as u64 * NANOS_PER_SEC;
        if now.wrapping_sub(entry.last_used_ns) > timeout {
            return None;
        }
        let found = backend::<F>(entry.backend_id)?;
        if found.state != backend_states::ACTIVE {
            return None;
        }
        self.remember(entry.backend_id, now);
        Some((entry.backend_id, found))
    }

    #[inline(always)]
    pub fn remember(&self, backend_id: u32, now: u64) {
        let entry = AffinityValue {
            last_used_ns: now,
            backend_id,
            pad: 0,
        };
        // A full LRU map evicts the oldest client; failure only costs affinity, not the
        // connection.
        let _ = F::affinity().insert(&self.key, &entry, 0);
    }
}
