//! Test data for intruder-gate: deterministic synthetic bases and adapters ([`synth`],
//! [`planted`]), the real MiniLM base and PEFT fixtures ([`data`]), the CLI binary ([`cli`]) and
//! report comparison ([`reports`]) and the optional tools' checks ([`tools`]). Used by the library's tests, the CLI's demo and the bench;
//! not part of the library's API.

pub mod cli;
pub mod data;
pub mod planted;
pub mod reports;
pub mod synth;
pub mod tools;

pub use cli::{cli, cli_path};
pub use data::{adapter_dir, fixtures, minilm_base, workspace_root, ADAPTERS, FIXTURES};
pub use planted::{planted, planted_trio, Planted, PlantedSpec, PLANTED};
pub use reports::{assert_same_numbers, cli_report, numbers};
pub use tools::tool_or_skip;
