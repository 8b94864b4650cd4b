//! tally-core: the pure heart of tally (DESIGN.md §1–§3).
//!
//! Units, periods, epochs, hybrid logical clocks, G-counter slots, LWW config registers,
//! the scope index and the check/record decisions, as plain values and functions. This
//! crate owns every rule about *what* is counted and decided; it must not touch tokio,
//! redb, chitchat, axum, the clock or any other I/O, and it cannot fail on I/O.

pub mod codec;
pub mod config;
pub mod counter;
pub mod hlc;
pub mod period;
pub mod prices;
pub mod rights;
pub mod scope;
pub mod state;
pub mod units;

pub use config::{
    AccessDenial, AccessRules, BrokenRule, DecommissionRecord, EntityRecord, LimitInput,
    LimitRecord, LimitSpec, Member, Mode, ResetRegister, Scope,
};
pub use counter::{Epoch, EpochCounter, OriginIdx};
pub use hlc::{Hlc, HlcClock, Version};
pub use period::{Period, PeriodError, PeriodSpec, Unit, Window};
pub use prices::{Price, PriceRecord, TokenKinds};
pub use rights::Rights;
pub use scope::LimitIdx;
pub use state::{
    Decision, DenyReason, Forgotten, GrantError, Holds, Increment, LimitCalendar, LimitStatus,
    LimitView, NoHolds, State, StateError,
};
pub use units::{Amounts, Metric, Micros};
