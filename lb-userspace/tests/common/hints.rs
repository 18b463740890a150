//! The reply hint maps (`LB4_RHINT_V1`, `LB6_RHINT_V1`): a new XDP flow's reverse entry
//! until its first reply. The reverse entries the programs go by are the reverse map's with
//! the hints not yet taken over them (tc egress looks at the hint first).
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Pod,
    maps::{Array, HashMap as BpfHash, Map, MapData},
};
use lb_common::{CtKey, ReplyHint, RevValue, hint_state, limits, reply_hint_slot};

/// Whether a slot holds a hint no reply took.
pub fn pending<A>(hint: &ReplyHint<A>) -> bool {
    hint.state & (hint_state::BUSY | hint_state::PENDING) == hint_state::PENDING
}

/// The hint of reply tuple `key`, not yet taken.
pub fn hint_of<A>(map: &Map, key: &CtKey<A>) -> Option<RevValue<A>>
where
    A: lb_common::MapAddr + PartialEq + Copy,
    ReplyHint<A>: Pod,
{
    let hints: Array<&MapData, ReplyHint<A>> = Array::try_from(map).expect("hint map type");
    let hint = hints
        .get(&reply_hint_slot(key), 0)
        .expect("reading a hint slot");
    (pending(&hint) && hint.key == *key).then_some(hint.rev)
}

/// The reverse entry of `key` as the programs see it: its hint, else the reverse map's.
pub fn reverse_entry<A>(
    hints: &Map,
    reverse: &BpfHash<&mut MapData, CtKey<A>, RevValue<A>>,
    key: &CtKey<A>,
) -> Option<RevValue<A>>
where
    A: lb_common::MapAddr + PartialEq + Copy,
    ReplyHint<A>: Pod,
    CtKey<A>: Pod,
    RevValue<A>: Pod,
{
    hint_of(hints, key).or_else(|| reverse.get(key, 0).ok())
}

/// `BPF_MAP_LOOKUP_BATCH`'s attribute.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Every slot (one `BPF_MAP_LOOKUP_BATCH`: 131,072 single lookups would dominate a test).
pub fn all<A>(map: &Map) -> Vec<ReplyHint<A>>
where
    ReplyHint<A>: Pod + Default + Clone,
{
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let Map::Array(data) = map else {
        panic!("the hint map is an array");
    };
    let n = limits::MAX_REPLY_HINTS as usize;
    let mut keys = vec![0u32; n];
    let mut values = vec![ReplyHint::<A>::default(); n];
    let mut out_batch = 0u32;
    let mut attr = BatchAttr {
        out_batch: &mut out_batch as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: n as u32,
        map_fd: data.fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: the attribute points at buffers of `count` keys and values, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_LOOKUP_BATCH,
            &mut attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let err = std::io::Error::last_os_error();
    // ENOENT: the batch reached the last slot, as it must.
    assert!(
        rc == 0 || err.raw_os_error() == Some(libc::ENOENT),
        "BPF_MAP_LOOKUP_BATCH: {err}"
    );
    assert_eq!(attr.count as usize, n, "every slot read");
    values
}

/// Empties every slot that is not empty.
pub fn clear<A>(map: &mut Map)
where
    ReplyHint<A>: Pod + Default + Clone,
{
    let used: Vec<u32> = all::<A>(map)
        .iter()
        .enumerate()
        .filter(|(_, h)| h.state != 0)
        .map(|(i, _)| i as u32)
        .collect();
    let mut hints: Array<&mut MapData, ReplyHint<A>> = Array::try_from(map).expect("hint map type");
    for i in used {
        hints
            .set(i, ReplyHint::<A>::default(), 0)
            .expect("clearing a hint slot");
    }
}
