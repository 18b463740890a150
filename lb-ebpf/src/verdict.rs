//! Why the north-south programs dropped or passed a packet: each program returns one reason
//! per packet (`lb_common::reasons`), counted here, and the reason gives the verdict.
use lb_common::reasons;

use crate::maps::LB4_REASONS_V1;

/// Adds one to `reason`'s counter of this CPU.
#[inline(always)]
pub fn count_reason(reason: u32) {
    if let Some(counter) = LB4_REASONS_V1.get_ptr_mut(reason) {
        // SAFETY: a per-CPU value, written only by programs running on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Counts `reason` and gives its XDP action.
#[inline(always)]
pub fn xdp_verdict(reason: u32) -> u32 {
    count_reason(reason);
    if reasons::drops(reason) {
        aya_ebpf::bindings::xdp_action::XDP_DROP
    } else {
        aya_ebpf::bindings::xdp_action::XDP_PASS
    }
}

/// Counts `reason` and gives its tc action.
#[inline(always)]
pub fn tc_verdict(reason: u32) -> i32 {
    count_reason(reason);
    if reasons::drops(reason) {
        aya_ebpf::bindings::TC_ACT_SHOT
    } else {
        aya_ebpf::bindings::TC_ACT_OK
    }
}
