//! What Fleetgate's test suites share, so no crate keeps its own copy: certificate authorities,
//! device and server certificates, and the chains devices present. A dev-dependency only.
#![forbid(unsafe_code)]

pub mod pki;
