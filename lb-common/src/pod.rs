//! `aya::Pod` for every map type, so the agent can read and write them.
use crate::*;

// SAFETY (all): #[repr(C)], only integer fields, no implicit padding (size asserts beside
// each type).
unsafe impl aya::Pod for Frontend4Key {}
unsafe impl aya::Pod for Frontend4Value {}
unsafe impl aya::Pod for Slot4Key {}
unsafe impl aya::Pod for Slot4Value {}
unsafe impl aya::Pod for Backend4 {}
unsafe impl aya::Pod for Maglev4Table {}
unsafe impl aya::Pod for Affinity4Key {}
unsafe impl aya::Pod for Affinity4Value {}
unsafe impl aya::Pod for Sock4Value {}
unsafe impl aya::Pod for Ct4Key {}
unsafe impl aya::Pod for Ct4Value {}
unsafe impl aya::Pod for Rev4Value {}
unsafe impl aya::Pod for Frag4Key {}
unsafe impl aya::Pod for Frag4Ports {}
unsafe impl aya::Pod for NameKey {}
unsafe impl aya::Pod for ServiceName {}
unsafe impl aya::Pod for ServiceStats {}
unsafe impl aya::Pod for SourceRange4Key {}
