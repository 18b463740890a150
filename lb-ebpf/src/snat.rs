//! SNAT ports of external flows to remote backends (`externalTrafficPolicy: Cluster`): the
//! node's address of the ingress interface and a port of `lb_common::snat_ports` become the
//! forwarded packet's source, so the backend's reply comes back to this node.
//!
//! Written once for both families (`F::flow_replies()` is `LB4_FLOWREV_V2` or
//! `LB6_FLOWREV_V1`), with the same port range for each.
//!
//! A port is claimed by inserting the reply's tuple (backend → node address, port) into
//! `F::flow_replies()` with `BPF_NOEXIST`; the claim is the reverse translation of the replies.
//! Each (backend address and port, node address, protocol) has the whole range: `TRIES`
//! ports from the flow's hash, then the rest of the range in order (`bpf_loop`, so the
//! verifier checks one probe, not 4,536). A port whose claim names a flow that is over (the
//! flow's conntrack entry expired, closed by an RST or FINs both ways, forgotten by the LRU,
//! or now naming another port) is taken over: the port comes back when its flow ends, not
//! only when the LRU evicts the claim. When a packet finds its flow's conntrack entry dead and
//! replaces it, the old flow's entries go ([`release`]).
//!
//! A search of the whole range that finds nothing is recorded (`LB4_SNATFULL_V1`): for
//! `EXHAUSTED_SECS` after, new flows of that pair try only their hashed ports, so a flood at a
//! full range costs `TRIES` probes a packet. Exhaustion is counted as
//! `xdp dropped_no_snat_port`.
use aya_ebpf::{bindings::BPF_NOEXIST, cty::c_void, helpers::generated::bpf_loop};
use lb_common::{CtKey, CtValue, IPPROTO_TCP, NANOS_PER_SEC, RevValue, ct_flags, snat_ports};

use crate::{conntrack, ip::Ip};

/// The state of one port search, shared with the `bpf_loop` callback. It lives in a per-CPU
/// scratch map (`LB4_SNATSEARCH`, `LB6_SNATSEARCH`, `Ip::snat_search`), keys included, so
/// neither the program's stack nor the callback's holds them: IPv6's keys are 40 bytes.
#[repr(C)]
pub struct Search<A> {
    now: u64,
    /// The claim's value: the flow's client and frontend, `ct_flags::SNAT`.
    rev: RevValue<A>,
    backend_addr: A,
    nat_addr: A,
    backend_port: u16,
    /// Offset of the first port tried.
    first: u16,
    /// Probes before this search (its attempts continue from there).
    done: u32,
    /// The port claimed (network byte order), 0 while none.
    found: u16,
    /// The claim probed: the reply's tuple (backend → node address, port).
    key: CtKey<A>,
    /// The client tuple of a claim found taken.
    client: CtKey<A>,
    /// The other entries of a taken claim's flow, as they are removed.
    other: CtKey<A>,
}

/// Claims a source port (network byte order) on `nat_addr` for the flow `rev` (its client
/// and frontend, `ct_flags::SNAT`) to `backend_addr:backend_port`, from the flow's `hash`.
/// `None`: every port is held by a live flow (or was, less than `EXHAUSTED_SECS` ago, and the
/// hashed ones still are).
#[inline(always)]
pub fn claim<F: Ip>(
    backend_addr: F::Addr,
    backend_port: u16,
    nat_addr: F::Addr,
    rev: RevValue<F::Addr>,
    hash: u32,
    now: u64,
) -> Option<u16> {
    // SAFETY: the per-CPU scratch value, used by this program run only (XDP does not nest on
    // a CPU); every field read is written first.
    let search = unsafe { &mut *F::snat_search()? };
    search.now = now;
    search.rev = rev;
    search.backend_addr = backend_addr;
    search.nat_addr = nat_addr;
    search.backend_port = backend_port;
    search.first = snat_ports::first(hash);
    search.done = 0;
    search.found = 0;
    if run::<F>(search, snat_ports::TRIES) {
        return Some(search.found);
    }
    // The key of the pair's exhaustion record, in the scratch too.
    search.key = CtKey::new(backend_addr, nat_addr, backend_port, 0, rev.proto);
    // SAFETY: copied out at once.
    if let Some(at) = unsafe { F::snat_exhausted().get(&search.key) }.copied()
        && now.wrapping_sub(at) < snat_ports::EXHAUSTED_SECS * NANOS_PER_SEC
    {
        return None;
    }
    search.done = snat_ports::TRIES;
    if run::<F>(search, snat_ports::COUNT as u32 - snat_ports::TRIES) {
        return Some(search.found);
    }
    search.key = CtKey::new(backend_addr, nat_addr, backend_port, 0, rev.proto);
    let _ = F::snat_exhausted().insert(&search.key, &now, 0);
    None
}

/// What the `bpf_loop` callback gets: the search, in its map value.
#[repr(C)]
struct Probing<A> {
    search: *mut Search<A>,
}

/// Probes `count` ports after `search.done`; whether one was claimed (`search.found`).
#[inline(always)]
fn run<F: Ip>(search: &mut Search<F::Addr>, count: u32) -> bool {
    let mut probing = Probing {
        search: search as *mut Search<F::Addr>,
    };
    // SAFETY: the callback is a function of this program taking the context given; the
    // context lives on this stack frame for the call.
    unsafe {
        bpf_loop(
            count,
            probe::<F> as *mut c_void,
            (&mut probing as *mut Probing<F::Addr>).cast(),
            0,
        );
    }
    search.found != 0
}

/// `bpf_loop` callback: tries the search's next port; 1 (stop) once one is claimed.
extern "C" fn probe<F: Ip>(index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `run` passes its `Probing` as the context, pointing at the search.
    let search = unsafe { &mut *(*(ctx as *mut Probing<F::Addr>)).search };
    let attempt = search.done.wrapping_add(index as u32);
    let port = snat_ports::probe(search.first, attempt).to_be();
    search.key = CtKey::new(
        search.backend_addr,
        search.nat_addr,
        search.backend_port,
        port,
        search.rev.proto,
    );
    if try_port::<F>(search) {
        search.found = port;
        1
    } else {
        0
    }
}

/// Claims the port of `search.key` (the reply's tuple) for `search.rev`: free, already this
/// flow's, or held by a flow that is over. Map values are read in place and keys built in the
/// search: the callback's stack adds to the program's (512 bytes for both).
#[inline(always)]
fn try_port<F: Ip>(search: &mut Search<F::Addr>) -> bool {
    let (key, rev, now) = (&search.key, &search.rev, search.now);
    // Looked up before inserting: an LRU map takes a free node (evicting if it must) before
    // it finds the key exists, so a failed insert is slow and may evict another flow's entry.
    let Some(taken) = F::flow_replies().get_ptr(key) else {
        // NOEXIST: of two CPUs claiming the port at once, one wins.
        return F::flow_replies()
            .insert(key, rev, BPF_NOEXIST as u64)
            .is_ok();
    };
    // SAFETY: a value of the lookup above, valid for this run; plain integers.
    let taken = unsafe { &*taken };
    if *taken == *rev {
        return true;
    }
    if taken.flags & ct_flags::SNAT == 0 {
        return false;
    }
    search.client = taken.client_key();
    let (key, client) = (&search.key, &search.client);
    if let Some(ct) = F::flows().get_ptr(client) {
        // SAFETY: as above.
        let ct = unsafe { &*ct };
        if names_claim(ct, key) {
            let live = conntrack::alive(ct, key.proto, 0, now)
                && !(key.proto == IPPROTO_TCP && conntrack::closed(ct.flags));
            if live {
                return false;
            }
            let _ = F::flows().remove(client);
        }
    }
    // The claim's flow is over: its entries go, and the port is claimed afresh (NOEXIST, so
    // of two CPUs taking it over at once one wins).
    release_entries::<F>(
        client,
        key.saddr,
        key.sport,
        key.daddr,
        key.dport,
        &mut search.other,
    );
    F::flow_replies()
        .insert(&search.key, &search.rev, BPF_NOEXIST as u64)
        .is_ok()
}

/// Whether the flow `ct` is SNATed to the port of the claim `key` (backend → node address,
/// port).
#[inline(always)]
fn names_claim<A: PartialEq>(ct: &CtValue<A>, key: &CtKey<A>) -> bool {
    ct.flags & ct_flags::SNAT != 0
        && ct.nat_addr == key.daddr
        && ct.nat_port == key.dport
        && ct.backend_addr == key.saddr
        && ct.backend_port == key.sport
}

/// Forgets the flow `ct` (client tuple `ct_key`) that is over: a SNAT flow gives back its
/// port (its claim, its entry for tc egress and its reply entry go), a flow to a local backend
/// its reply entry; each only while it still names this flow. Without the latter, a flow whose
/// tuple a new flow takes over with another backend left its reply entry in the LRU map until
/// evicted. A function of its own (a BPF-to-BPF call): its keys stay off the stack the port
/// search's callback adds to.
#[inline(never)]
pub fn release<F: Ip>(ct_key: &CtKey<F::Addr>, ct: &CtValue<F::Addr>) {
    let mut key = CtKey::default();
    if ct.flags & ct_flags::SNAT != 0 {
        release_entries::<F>(
            ct_key,
            ct.backend_addr,
            ct.backend_port,
            ct.nat_addr,
            ct.nat_port,
            &mut key,
        );
    } else {
        release_reply::<F>(ct_key, ct.backend_addr, ct.backend_port, &mut key);
    }
}

/// Removes the reverse entries of the SNAT flow from `client` (its client tuple) to the
/// backend on the node's `nat_addr:nat_port` that still name it.
#[inline(always)]
fn release_entries<F: Ip>(
    client: &CtKey<F::Addr>,
    backend_addr: F::Addr,
    backend_port: u16,
    nat_addr: F::Addr,
    nat_port: u16,
    key: &mut CtKey<F::Addr>,
) {
    let proto = client.proto;
    // One key, rewritten, given by the caller (the search's, in the callback).
    *key = CtKey::new(backend_addr, nat_addr, backend_port, nat_port, proto);
    if names_client::<F>(&*key, client, ct_flags::SNAT) {
        let _ = F::flow_replies().remove(&*key);
    }
    *key = CtKey::new(
        client.saddr,
        backend_addr,
        client.sport,
        backend_port,
        proto,
    );
    if let Some(rev) = F::flow_replies().get_ptr(&*key) {
        // SAFETY: a value of the lookup above, valid for this run.
        let rev = unsafe { &*rev };
        if rev.flags & ct_flags::SNAT_OUT != 0
            && rev.frontend_addr == nat_addr
            && rev.frontend_port == nat_port
        {
            let _ = F::flow_replies().remove(&*key);
        }
    }
    release_reply::<F>(client, backend_addr, backend_port, key);
}

/// Removes the reply entry (backend → client, no SNAT bits) of the flow from `client` while it
/// still names that flow.
#[inline(always)]
fn release_reply<F: Ip>(
    client: &CtKey<F::Addr>,
    backend_addr: F::Addr,
    backend_port: u16,
    key: &mut CtKey<F::Addr>,
) {
    *key = CtKey::new(
        backend_addr,
        client.saddr,
        backend_port,
        client.sport,
        client.proto,
    );
    if names_client::<F>(&*key, client, 0) {
        let _ = F::flow_replies().remove(&*key);
    }
    // Or the flow never had a reply: its entry is a hint still.
    crate::hint::forget::<F>(&*key, Some(client));
}

/// Whether the reverse entry `key` exists, has exactly the SNAT bits `snat` and belongs to the
/// flow from `client`.
#[inline(always)]
fn names_client<F: Ip>(key: &CtKey<F::Addr>, client: &CtKey<F::Addr>, snat: u8) -> bool {
    let Some(rev) = F::flow_replies().get_ptr(key) else {
        return false;
    };
    // SAFETY: a value of the lookup above, valid for this run.
    let rev = unsafe { &*rev };
    // Field by field: no 40-byte key built on the callback's stack.
    rev.flags & (ct_flags::SNAT | ct_flags::SNAT_OUT) == snat
        && rev.client_addr == client.saddr
        && rev.frontend_addr == client.daddr
        && rev.client_port == client.sport
        && rev.frontend_port == client.dport
        && rev.proto == client.proto
}
