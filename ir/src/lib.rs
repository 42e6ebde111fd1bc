//! llmc's graph IR: a typed dataflow graph on petgraph.
//!
//! Processing order inside this crate mirrors its use: [`types`] (dtypes, symbolic shapes),
//! [`op`] (the op set and its type rules), [`graph`] (the petgraph-backed graph and its builder
//! API), [`verify`], [`print`] / [`parse`] (the text form, `parse(print(g)) == g`), and
//! [`interp`], the reference interpreter that every pass and backend is checked against.

pub mod error;
pub mod graph;
pub mod interp;
pub mod op;
pub mod parse;
pub mod print;
pub mod types;
pub mod verify;

pub use error::{IrError, Result};
pub use graph::{Graph, Node, NodeId, StateDecl};
pub use interp::{Interpreter, Tensor, WeightSource};
pub use op::{BinaryOp, Op, ReduceOp, UnaryOp};
pub use parse::parse;
pub use print::print;
pub use types::{Bindings, DType, Dim, TensorType};
pub use verify::verify;
