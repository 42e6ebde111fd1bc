//! Fuzz target: the IR text parser, with verify and a print/parse round trip when it parses.
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::ir_text(data));
