//! Reply hints (`lb_common::ReplyHint`, `LB4_RHINT_V1`, `LB6_RHINT_V1`): a new flow's reverse
//! entry is written by XDP into a slot of a direct-mapped array (a plain write, not an LRU
//! insert), and moved into the reverse map (`Family::flow_replies`) by tc egress at the
//! flow's first reply. So the first packet of a flow makes one LRU insert (its conntrack
//! entry), and a flow that is never answered (a scan, a SYN flood) none for its replies.
//!
//! No flow loses its reverse entry to another flow wanting its slot: a writer that finds the
//! slot holding a hint no reply took inserts that hint into the reverse map before it takes
//! the slot (or, when it cannot take the slot, inserts its own entry there directly). Readers
//! look at the slot before the reverse map, so a hint moved to the map between the two
//! lookups is found in the map.
//!
//! The slot's `state` (`lb_common::hint_state`) changes only by atomic compare-and-swap or
//! exchange, with a new generation each time; a writer holds `BUSY` while it writes. A
//! reader copies the slot between two reads of `state` and takes the copy only if they agree
//! and the slot was `PENDING` and not `BUSY`: one flow's whole hint, never a torn mix.
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xchg, volatile_copy_nonoverlapping_memory},
    ptr::read_volatile,
};

use lb_common::{Backend, CtKey, ReplyHint, RevValue, hint_state, reply_hint_slot};

use crate::{family::Family, ip::Ip, parse::Packet};

type Slot<F> = ReplyHint<<F as Family>::Addr>;

/// Per CPU (`LB4_HINTSCRATCH`, `LB6_HINTSCRATCH`, `Ip::hint_scratch`): a new flow's reverse
/// entry and the hint it may move to the reverse map, in a map value rather than on the
/// stack (IPv6's last XDP stage has no 160 bytes to spare).
#[repr(C)]
pub struct Scratch<A> {
    key: CtKey<A>,
    rev: RevValue<A>,
    old_key: CtKey<A>,
    old_rev: RevValue<A>,
}

/// XDP, a new flow (`pkt`, its first packet, to `backend`): records the reverse entry of its
/// replies, as a hint when it can, else in the reverse map. `Err` when the reverse map
/// refused it. A function of its own (a BPF-to-BPF call): IPv6's last XDP stage has no
/// stack to spare for it.
#[inline(never)]
pub fn record<F: Ip>(pkt: &Packet<F::Addr>, backend: &Backend<F::Addr>) -> Result<(), ()> {
    let Some(s) = F::hint_scratch() else {
        return Err(());
    };
    // SAFETY: this CPU's scratch value (XDP does not nest on a CPU); written before read.
    let s = unsafe { &mut *s };
    // The reply (backend → client) gets the frontend as its source again at tc egress.
    s.key = CtKey::new(backend.addr, pkt.saddr, backend.port, pkt.sport, pkt.proto);
    s.rev = RevValue {
        client_addr: pkt.saddr,
        frontend_addr: pkt.daddr,
        client_port: pkt.sport,
        frontend_port: pkt.dport,
        flags: 0,
        proto: pkt.proto,
        pad: 0,
    };
    if write::<F>(s) {
        return Ok(());
    }
    F::flow_replies().insert(&s.key, &s.rev, 0).map_err(|_| ())
}

/// The slot of `key`.
#[inline(always)]
fn slot<F: Family>(key: &CtKey<F::Addr>) -> Option<*mut Slot<F>> {
    F::reply_hints().get_ptr_mut(reply_hint_slot(key))
}

/// Compare-and-swap of a slot's state; whether it was `seen`.
///
/// # Safety
/// `state` points at a slot's state in the map (valid for this program run, 8-byte aligned).
#[inline(always)]
unsafe fn swap_state(state: *mut u64, seen: u64, new: u64) -> bool {
    // SAFETY: the caller's pointer; an atomic of the BPF instruction set.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            state, seen, new,
        )
        .1
    }
}

/// Writes the hint into its slot; false when the slot is another writer's, or holds a hint
/// that could not be moved to the reverse map.
#[inline(always)]
fn write<F: Family>(s: &mut Scratch<F::Addr>) -> bool {
    let Some(slot) = slot::<F>(&s.key) else {
        return false;
    };
    // SAFETY (every access below): `slot` points at a value of the array, valid for this run;
    // other CPUs write it only as the module says.
    let state = unsafe { &raw mut (*slot).state };
    let seen = unsafe { read_volatile(state) };
    if seen & hint_state::BUSY != 0 {
        return false;
    }
    if seen & hint_state::PENDING != 0 {
        // Another flow's hint no reply took yet: into the reverse map with it first, before
        // the slot is taken, so a reply looking now finds it there.
        unsafe {
            volatile_copy_nonoverlapping_memory(&raw mut s.old_key, &raw const (*slot).key, 1);
            volatile_copy_nonoverlapping_memory(&raw mut s.old_rev, &raw const (*slot).rev, 1);
        }
        if unsafe { read_volatile(state) } != seen {
            return false;
        }
        if s.old_key != s.key && F::flow_replies().insert(&s.old_key, &s.old_rev, 0).is_err() {
            return false;
        }
    }
    if !unsafe { swap_state(state, seen, seen | hint_state::BUSY) } {
        return false;
    }
    unsafe {
        volatile_copy_nonoverlapping_memory(&raw mut (*slot).key, &raw const s.key, 1);
        volatile_copy_nonoverlapping_memory(&raw mut (*slot).rev, &raw const s.rev, 1);
        let next = seen.wrapping_add(hint_state::GENERATION) | hint_state::PENDING;
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(state, next);
    }
    true
}

/// tc egress: the reverse entry of the packet with tuple `key`, from its flow's hint (then
/// moved into the reverse map: this is the flow's first reply) or from the reverse map.
#[inline(always)]
pub fn reply<F: Family>(key: &CtKey<F::Addr>) -> Option<RevValue<F::Addr>> {
    if let Some(rev) = take::<F>(key) {
        return Some(rev);
    }
    // SAFETY: copied out at once.
    unsafe { F::flow_replies().get(key) }.copied()
}

/// The hint of `key` if its slot holds it, not yet taken; inserted into the reverse map and
/// cleared. Left in place when the map refuses the entry, for the next reply.
#[inline(always)]
fn take<F: Family>(key: &CtKey<F::Addr>) -> Option<RevValue<F::Addr>> {
    let slot = slot::<F>(key)?;
    // SAFETY (every access below): as in `write`.
    let state = unsafe { &raw mut (*slot).state };
    let seen = unsafe { read_volatile(state) };
    if seen & (hint_state::BUSY | hint_state::PENDING) != hint_state::PENDING {
        return None;
    }
    // SAFETY: as above.
    if !unsafe { holds::<F>(slot, key) } {
        return None;
    }
    let rev = unsafe { read_volatile(&raw const (*slot).rev) };
    if unsafe { read_volatile(state) } != seen {
        return None; // taken or moved meanwhile: in the reverse map now
    }
    if F::flow_replies().insert(key, &rev, 0).is_ok() {
        // Fails only if the slot changed since: then the hint was taken or moved to the map.
        let next = seen.wrapping_add(hint_state::GENERATION) & !hint_state::PENDING;
        unsafe { swap_state(state, seen, next) };
    }
    Some(rev)
}

/// Whether the slot's key is `key`, read field by field (no key copied onto the stack: IPv6's
/// is 40 bytes, and tc egress and the SNAT search's callback are short of stack).
///
/// # Safety
/// `slot` points at a value of the array, valid for this program run.
#[inline(always)]
unsafe fn holds<F: Family>(slot: *const Slot<F>, key: &CtKey<F::Addr>) -> bool {
    // SAFETY: the caller's pointer; plain reads of integers another CPU may be writing (the
    // state read around them says whether they are one write's).
    unsafe {
        let k = &raw const (*slot).key;
        read_volatile(&raw const (*k).saddr) == key.saddr
            && read_volatile(&raw const (*k).daddr) == key.daddr
            && read_volatile(&raw const (*k).sport) == key.sport
            && read_volatile(&raw const (*k).dport) == key.dport
            && read_volatile(&raw const (*k).proto) == key.proto
    }
}

/// Clears the hint of the replies `key` if its slot holds it, not yet taken, and (with
/// `client`) it is the plain reply entry (no SNAT bits) of the flow from `client`.
#[inline(always)]
pub fn forget<F: Family>(key: &CtKey<F::Addr>, client: Option<&CtKey<F::Addr>>) {
    let Some(slot) = slot::<F>(key) else {
        return;
    };
    // SAFETY (every access below): as in `write`. Field by field: no key copied onto the
    // stack (this runs in the SNAT search's callback too).
    let state = unsafe { &raw mut (*slot).state };
    let seen = unsafe { read_volatile(state) };
    if seen & (hint_state::BUSY | hint_state::PENDING) != hint_state::PENDING {
        return;
    }
    if !unsafe { holds::<F>(slot, key) } {
        return;
    }
    let r = unsafe { &raw const (*slot).rev };
    if let Some(client) = client {
        let names = unsafe {
            read_volatile(&raw const (*r).flags) == 0
                && read_volatile(&raw const (*r).client_addr) == client.saddr
                && read_volatile(&raw const (*r).frontend_addr) == client.daddr
                && read_volatile(&raw const (*r).client_port) == client.sport
                && read_volatile(&raw const (*r).frontend_port) == client.dport
        };
        if !names {
            return;
        }
    }
    // Only if nothing changed since the reads above (else another flow's hint is there now,
    // or this one was taken).
    let next = seen.wrapping_add(hint_state::GENERATION) & !hint_state::PENDING;
    unsafe { swap_state(state, seen, next) };
}
