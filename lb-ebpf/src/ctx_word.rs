//! The address fields of a program's context (`bpf_sock_addr.user_ip6`, `msg_src_ip6`,
//! `bpf_sock.src_ip6`, ...) read and written one 4-byte word at a time: the verifier refuses
//! wider accesses to them (an 8-byte store to `user_ip6` needs a newer kernel), and LLVM merges
//! adjacent plain loads of an 8-byte aligned field into one. A volatile access is never merged.
use lb_common::Addr6;

/// One word of the context, loaded as one 4-byte access.
#[inline(always)]
pub fn get(field: &u32) -> u32 {
    // SAFETY: a reference to a field of the context, valid for the program's run.
    unsafe { core::ptr::read_volatile(field) }
}

/// Stores one word of the context as one 4-byte access.
#[inline(always)]
pub fn set(field: &mut u32, value: u32) {
    // SAFETY: a reference to a writable field of the context, valid for the program's run.
    unsafe { core::ptr::write_volatile(field, value) }
}

/// An IPv6 address field, word by word.
#[inline(always)]
pub fn get6(field: &[u32; 4]) -> Addr6 {
    [
        get(&field[0]),
        get(&field[1]),
        get(&field[2]),
        get(&field[3]),
    ]
}

/// Stores an IPv6 address field, word by word.
#[inline(always)]
pub fn set6(field: &mut [u32; 4], value: Addr6) {
    for (word, value) in field.iter_mut().zip(value) {
        set(word, value);
    }
}
