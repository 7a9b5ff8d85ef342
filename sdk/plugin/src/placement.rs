//! The `placement` world: order the hosts that hold a chunk's copies.
//!
//! ```text
//!  host (stratad)                       this module                      your crate
//!  ──────────────                       ───────────                      ──────────
//!  init(config)      ──► export_placement! ─► __private::init ──► P::init(config, env)
//!  place(chunk, ..)  ──►        (Guest)       (thread-local     ──► p.place(..)
//!  rebalance(change) ──►                       instance)        ──► p.rebalance(..)
//!  log / clock / kv  ◄──────────────── WitEnv (impl Env) ◄──────── env.log(..), env.kv_set(..)
//! ```
//!
//! Implement [`Placement`], then call [`export_placement!`](crate::export_placement) once at
//! the crate root.

use std::any::Any;
use std::cell::RefCell;

use crate::Env;

/// Bindings generated from `wit/` for the `placement` world. Plugins normally use the
/// re-exports of the parent module instead.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "placement",
        pub_export_macro: true,
        export_macro_name: "__export_placement_world",
        default_bindings_module: "strata_plugin_sdk::placement::bindings",
        generate_all,
        with: {
            "strata:plugin/dm-types@0.1.0/timestamp": crate::Timestamp,
        },
        additional_derives: [PartialEq, Eq, Hash],
    });
}

pub use bindings::strata::plugin::placement_types::{
    ChunkMove, ChunkPlacement, ChunkRef, HostInfo, MembershipChange,
};

/// A chunk placement policy.
///
/// The host runs `init` on every component instance it creates (it may keep several instances
/// of one version, e.g. a pool, and discards any that trapped); the later calls on that
/// instance go to the value `init` returned. Calls on one instance are never concurrent.
/// State that must be shared by instances or survive swaps belongs in the key-value store.
pub trait Placement: Sized + 'static {
    /// Configure the plugin from the slot's config text. This is also the self-test of a hot
    /// swap: an error refuses the new version and the old one stays in place.
    fn init(config: &str, env: &mut dyn Env) -> Result<Self, String>;

    /// Order `hosts` for `chunk` (of `size` bytes): the first host id holds the alpha copy,
    /// the next ones the other copies. Return host ids taken from `hosts` only, without
    /// repetition.
    fn place(
        &mut self,
        chunk: &ChunkRef,
        size: u64,
        hosts: &[HostInfo],
        env: &mut dyn Env,
    ) -> Result<Vec<String>, String>;

    /// The copies to move after hosts joined or left.
    fn rebalance(
        &mut self,
        change: &MembershipChange,
        env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String>;
}

/// [`Env`] backed by the component's imports. Only usable inside a component (natively the
/// imports are stubs that panic); plugin code receives it as `&mut dyn Env`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WitEnv;

crate::env::wit_env_impl!(WitEnv);

/// Glue used by [`export_placement!`](crate::export_placement); not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    thread_local! {
        /// The instance created by the last successful `init` (a `P`), if any.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn not_initialized(call: &str) -> String {
        format!("placement plugin: `{call}` called before a successful `init`")
    }

    fn with_instance<P: Placement, R>(
        call: &str,
        f: impl FnOnce(&mut P) -> Result<R, String>,
    ) -> Result<R, String> {
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_mut().and_then(|b| b.downcast_mut::<P>()) {
                Some(p) => f(p),
                None => Err(not_initialized(call)),
            }
        })
    }

    /// `init`: replaces the instance; a failed `init` leaves none (later calls fail).
    pub fn init<P: Placement>(config: &str, env: &mut dyn Env) -> Result<(), String> {
        INSTANCE.with(|slot| slot.borrow_mut().take());
        let instance = P::init(config, env)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(instance)));
        Ok(())
    }

    /// `place`, forwarded to the instance.
    pub fn place<P: Placement>(
        chunk: &ChunkRef,
        size: u64,
        hosts: &[HostInfo],
        env: &mut dyn Env,
    ) -> Result<Vec<String>, String> {
        with_instance::<P, _>("place", |p| p.place(chunk, size, hosts, env))
    }

    /// `rebalance`, forwarded to the instance.
    pub fn rebalance<P: Placement>(
        change: &MembershipChange,
        env: &mut dyn Env,
    ) -> Result<Vec<ChunkMove>, String> {
        with_instance::<P, _>("rebalance", |p| p.rebalance(change, env))
    }
}

/// Export a [`Placement`](crate::placement::Placement) implementation as the component's
/// `placement` world. Use once, at the crate root:
///
/// ```ignore
/// strata_plugin_sdk::export_placement!(MyPlacement);
/// ```
///
/// The exports (`init`, `place`, `rebalance`, `cabi_realloc`, ...) are only emitted when
/// compiling for `wasm32`; native builds (unit tests, clippy) just check that the type
/// implements the trait.
#[macro_export]
macro_rules! export_placement {
    ($ty:ty) => {
        const _: fn() = || {
            fn implements_placement<T: $crate::placement::Placement>() {}
            implements_placement::<$ty>();
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __StrataPlacementGuest;

            impl $crate::placement::bindings::Guest for __StrataPlacementGuest {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::placement::__private::init::<$ty>(
                        &config,
                        &mut $crate::placement::WitEnv,
                    )
                }

                fn place(
                    chunk: $crate::placement::ChunkRef,
                    size: u64,
                    hosts: ::std::vec::Vec<$crate::placement::HostInfo>,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<::std::string::String>,
                    ::std::string::String,
                > {
                    $crate::placement::__private::place::<$ty>(
                        &chunk,
                        size,
                        &hosts,
                        &mut $crate::placement::WitEnv,
                    )
                }

                fn rebalance(
                    change: $crate::placement::MembershipChange,
                ) -> ::core::result::Result<
                    ::std::vec::Vec<$crate::placement::ChunkMove>,
                    ::std::string::String,
                > {
                    $crate::placement::__private::rebalance::<$ty>(
                        &change,
                        &mut $crate::placement::WitEnv,
                    )
                }
            }

            $crate::placement::bindings::__export_placement_world!(
                __StrataPlacementGuest with_types_in $crate::placement::bindings
            );
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemEnv;

    struct Counter {
        config: String,
        calls: u64,
    }

    impl Placement for Counter {
        fn init(config: &str, env: &mut dyn Env) -> Result<Self, String> {
            if config == "fail" {
                return Err("refused".into());
            }
            env.info("init");
            Ok(Counter {
                config: config.into(),
                calls: 0,
            })
        }

        fn place(
            &mut self,
            _chunk: &ChunkRef,
            _size: u64,
            hosts: &[HostInfo],
            _env: &mut dyn Env,
        ) -> Result<Vec<String>, String> {
            self.calls += 1;
            Ok(hosts.iter().map(|h| h.id.clone()).collect())
        }

        fn rebalance(
            &mut self,
            _change: &MembershipChange,
            _env: &mut dyn Env,
        ) -> Result<Vec<ChunkMove>, String> {
            Err(format!("{} after {} calls", self.config, self.calls))
        }
    }

    fn chunk() -> ChunkRef {
        ChunkRef {
            space: "s".into(),
            name: "c".into(),
        }
    }

    fn host(id: &str) -> HostInfo {
        HostInfo {
            id: id.into(),
            free_bytes: 1,
            capacity_bytes: 1,
        }
    }

    fn change() -> MembershipChange {
        MembershipChange {
            before: vec![],
            after: vec![],
            chunks: vec![],
        }
    }

    #[test]
    fn calls_before_init_fail_without_panicking() {
        let env = &mut MemEnv::new();
        let err = __private::place::<Counter>(&chunk(), 1, &[host("a")], env).unwrap_err();
        assert!(err.contains("before a successful `init`"), "{err}");
        assert!(__private::rebalance::<Counter>(&change(), env).is_err());
    }

    #[test]
    fn forwards_to_the_instance_made_by_init() {
        let env = &mut MemEnv::new();
        __private::init::<Counter>("cfg", env).unwrap();
        let order = __private::place::<Counter>(&chunk(), 1, &[host("a"), host("b")], env);
        assert_eq!(order.unwrap(), ["a", "b"]);
        let err = __private::rebalance::<Counter>(&change(), env).unwrap_err();
        assert_eq!(err, "cfg after 1 calls");
        assert_eq!(env.logs().len(), 1);
    }

    #[test]
    fn failed_init_drops_the_previous_instance() {
        let env = &mut MemEnv::new();
        __private::init::<Counter>("cfg", env).unwrap();
        assert_eq!(
            __private::init::<Counter>("fail", env),
            Err("refused".into())
        );
        assert!(__private::place::<Counter>(&chunk(), 1, &[host("a")], env).is_err());
    }
}
