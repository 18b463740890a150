//! `aya::Pod` for every map type, so the agent can read and write them.
use crate::*;

// SAFETY (all): #[repr(C)], only integer fields, no implicit padding (size asserts beside
// each type).
unsafe impl aya::Pod for FrontendValue {}
unsafe impl aya::Pod for SlotKey {}
unsafe impl aya::Pod for SlotValue {}
unsafe impl aya::Pod for MaglevTable {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for FragPorts {}
unsafe impl aya::Pod for ServiceName {}
unsafe impl aya::Pod for ServiceStats {}

/// The per-family types, for both families.
macro_rules! pod_per_family {
    ($($ty:ident),*) => {
        $(
            // SAFETY: as above, for either address type (integers and integer arrays).
            unsafe impl aya::Pod for $ty<Addr4> {}
            // SAFETY: as above.
            unsafe impl aya::Pod for $ty<Addr6> {}
        )*
    };
}
pod_per_family!(
    FrontendKey,
    Backend,
    AffinityKey,
    SockValue,
    CtKey,
    CtValue,
    RevValue,
    ReplyHint,
    FragKey,
    NameKey,
    SourceRangeKey
);
