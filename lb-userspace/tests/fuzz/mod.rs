//! Differential packet fuzzing of the north-south programs: a reference model written from
//! the spec ([`model`]), a seeded generator of services and frames ([`generator`]), and a runner
//! that puts every frame through the real XDP and tc programs and the model and diffs them
//! ([`runner`]). `cargo xtask fuzz [--packets N] [--seed S]` runs it.
#![allow(dead_code)]

pub mod generator;
pub mod model;
pub mod runner;
pub mod wire;
