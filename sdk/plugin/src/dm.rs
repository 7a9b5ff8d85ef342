//! The `dm-policy` world: a data-management (HSM) policy driven by DMAPI events and scans.
//!
//! ```text
//!  host (stratad)                        this module                     your crate
//!  ──────────────                        ───────────                     ──────────
//!  init(config)       ──► export_dm_policy! ─► __private::init ──► P::init(config, host)
//!  on-event(event)    ──►       (Guest)        (thread-local   ──► p.on_event(..) -> Response
//!  on-notify(event)   ──►                       instance)      ──► p.on_notify(..)
//!  scan(batch)        ──►                                      ──► p.scan(..) -> [ScanAction]
//!  dm-host / log / kv ◄─────────────── WitHost (impl DmHost) ◄──── host.get_dmattr(..), ...
//! ```
//!
//! Implement [`DmPolicy`], then call [`export_dm_policy!`](crate::export_dm_policy) once at
//! the crate root. Test with [`MemHost`](crate::testing::MemHost).

use std::any::Any;
use std::cell::RefCell;

use crate::{AttrNameError, Env};

/// Bindings generated from `wit/` for the `dm-policy` world. Plugins normally use the
/// re-exports of the parent module instead.
#[allow(missing_docs, unsafe_code, clippy::all)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "dm-policy",
        pub_export_macro: true,
        export_macro_name: "__export_dm_policy_world",
        default_bindings_module: "strata_plugin_sdk::dm::bindings",
        generate_all,
        with: {
            "strata:plugin/dm-types@0.1.0/timestamp": crate::Timestamp,
        },
        additional_derives: [PartialEq, Eq, Hash],
    });
}

pub use bindings::strata::plugin::dm_types::{
    Action, AttrName, CancelEvent, DataEvent, DestroyEvent, DmError, Event, EventData, EventType,
    Extent, ExtentType, FileStat, Handle, MountEvent, NamespaceEvent, Region, RegionFlags,
    Response, Right, ScanAction, Sequence, SessionId, Token,
};

/// `EIO`: the errno to answer [`Response::Abort`] with when data cannot be brought back.
pub const EIO: u32 = 5;

/// The DM attribute in which the runtime records where a file's data was migrated (value: the
/// tier name, UTF-8). Set by the host when it carries out [`Action::Migrate`] /
/// `request-migrate`; a policy reads it with [`DmHost::get_dmattr`] and
/// [`attr_name`](crate::attr_name)`(MIGRATION_ATTR)`.
pub const MIGRATION_ATTR: &str = "stratloc";

impl EventType {
    /// The WIT name of the event type (`"read"`, `"postcreate"`, ...), for logs.
    pub fn name(self) -> &'static str {
        match self {
            EventType::Close => "close",
            EventType::Mount => "mount",
            EventType::Preunmount => "preunmount",
            EventType::Unmount => "unmount",
            EventType::Nospace => "nospace",
            EventType::Debut => "debut",
            EventType::Create => "create",
            EventType::Postcreate => "postcreate",
            EventType::Remove => "remove",
            EventType::Postremove => "postremove",
            EventType::Rename => "rename",
            EventType::Postrename => "postrename",
            EventType::Symlink => "symlink",
            EventType::Postsymlink => "postsymlink",
            EventType::Link => "link",
            EventType::Postlink => "postlink",
            EventType::Read => "read",
            EventType::Write => "write",
            EventType::Truncate => "truncate",
            EventType::Attribute => "attribute",
            EventType::Cancel => "cancel",
            EventType::Destroy => "destroy",
            EventType::User => "user",
        }
    }
}

impl From<AttrNameError> for DmError {
    /// A bad attribute name is what the host would refuse with `einval`.
    fn from(_: AttrNameError) -> DmError {
        DmError::Einval
    }
}

/// DMAPI calls on behalf of a `dm-policy` plugin (WIT `dm-host`), plus the [`Env`] services.
///
/// During `on-event` the calls run under the token of the event being handled; during `scan`
/// under DM_NO_TOKEN (rights are acquired per call). Handles are opaque bytes; attribute names
/// are exactly 8 bytes (use [`attr_name`](crate::attr_name)).
pub trait DmHost: Env {
    /// dm_get_fileattr.
    fn stat(&mut self, handle: &[u8]) -> Result<FileStat, DmError>;
    /// dm_get_dmattr: the attribute's value; `enoent` if the file has no such attribute.
    fn get_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, DmError>;
    /// dm_set_dmattr.
    fn set_dmattr(&mut self, handle: &[u8], name: &[u8], value: &[u8]) -> Result<(), DmError>;
    /// dm_remove_dmattr.
    fn remove_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<(), DmError>;
    /// dm_get_region.
    fn get_regions(&mut self, handle: &[u8]) -> Result<Vec<Region>, DmError>;
    /// dm_set_region; returns exactflag.
    fn set_regions(&mut self, handle: &[u8], regions: &[Region]) -> Result<bool, DmError>;
    /// dm_get_allocinfo from `offset`.
    fn allocinfo(&mut self, handle: &[u8], offset: u64) -> Result<Vec<Extent>, DmError>;
    /// dm_probe_hole: the `(offset, length)` that `punch_hole` would free (length 0 = to EOF).
    fn probe_hole(
        &mut self,
        handle: &[u8],
        offset: u64,
        length: u64,
    ) -> Result<(u64, u64), DmError>;
    /// dm_punch_hole.
    fn punch_hole(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<(), DmError>;
    /// dm_read_invis: no events, no timestamp changes.
    fn read_invis(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<Vec<u8>, DmError>;
    /// dm_write_invis; `sync` is DM_WRITE_SYNC. Returns the bytes written.
    fn write_invis(
        &mut self,
        handle: &[u8],
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, DmError>;
    /// Ask the host to copy the file's data natively to the named tier.
    fn request_migrate(&mut self, handle: &[u8], tier: &str) -> Result<(), DmError>;
    /// Ask the host to bring the file's data (this range; length 0 = to EOF) back natively.
    fn request_recall(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<(), DmError>;
}

/// A data-management policy.
///
/// The host runs `init` on every component instance it creates (possibly several per version);
/// the later calls on that instance go to the value `init` returned. Calls on one instance are
/// never concurrent. Shared or durable state belongs in the key-value store.
pub trait DmPolicy: Sized + 'static {
    /// Configure the plugin from the slot's config text (also the hot-swap self-test: an error
    /// refuses the new version).
    fn init(config: &str, host: &mut dyn DmHost) -> Result<Self, String>;

    /// A synchronous event: the operation waits for the answer.
    fn on_event(&mut self, event: &Event, host: &mut dyn DmHost) -> Response;

    /// An asynchronous event: nothing waits for it. Ignored unless overridden.
    fn on_notify(&mut self, event: &Event, host: &mut dyn DmHost) {
        let _ = (event, host);
    }

    /// A periodic policy run over a batch of files: what to do with each. Files without an
    /// entry in the answer are left alone.
    fn scan(&mut self, batch: &[FileStat], host: &mut dyn DmHost) -> Vec<ScanAction>;
}

/// [`DmHost`] backed by the component's imports. Only usable inside a component (natively the
/// imports are stubs that panic); plugin code receives it as `&mut dyn DmHost`.
#[derive(Debug, Default, Clone, Copy)]
pub struct WitHost;

crate::env::wit_env_impl!(WitHost);

impl DmHost for WitHost {
    fn stat(&mut self, handle: &[u8]) -> Result<FileStat, DmError> {
        bindings::strata::plugin::dm_host::stat(handle)
    }
    fn get_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<Vec<u8>, DmError> {
        bindings::strata::plugin::dm_host::get_dmattr(handle, name)
    }
    fn set_dmattr(&mut self, handle: &[u8], name: &[u8], value: &[u8]) -> Result<(), DmError> {
        bindings::strata::plugin::dm_host::set_dmattr(handle, name, value)
    }
    fn remove_dmattr(&mut self, handle: &[u8], name: &[u8]) -> Result<(), DmError> {
        bindings::strata::plugin::dm_host::remove_dmattr(handle, name)
    }
    fn get_regions(&mut self, handle: &[u8]) -> Result<Vec<Region>, DmError> {
        bindings::strata::plugin::dm_host::get_regions(handle)
    }
    fn set_regions(&mut self, handle: &[u8], regions: &[Region]) -> Result<bool, DmError> {
        bindings::strata::plugin::dm_host::set_regions(handle, regions)
    }
    fn allocinfo(&mut self, handle: &[u8], offset: u64) -> Result<Vec<Extent>, DmError> {
        bindings::strata::plugin::dm_host::allocinfo(handle, offset)
    }
    fn probe_hole(
        &mut self,
        handle: &[u8],
        offset: u64,
        length: u64,
    ) -> Result<(u64, u64), DmError> {
        bindings::strata::plugin::dm_host::probe_hole(handle, offset, length)
    }
    fn punch_hole(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<(), DmError> {
        bindings::strata::plugin::dm_host::punch_hole(handle, offset, length)
    }
    fn read_invis(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<Vec<u8>, DmError> {
        bindings::strata::plugin::dm_host::read_invis(handle, offset, length)
    }
    fn write_invis(
        &mut self,
        handle: &[u8],
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<u64, DmError> {
        bindings::strata::plugin::dm_host::write_invis(handle, offset, data, sync)
    }
    fn request_migrate(&mut self, handle: &[u8], tier: &str) -> Result<(), DmError> {
        bindings::strata::plugin::dm_host::request_migrate(handle, tier)
    }
    fn request_recall(&mut self, handle: &[u8], offset: u64, length: u64) -> Result<(), DmError> {
        bindings::strata::plugin::dm_host::request_recall(handle, offset, length)
    }
}

/// Glue used by [`export_dm_policy!`](crate::export_dm_policy); not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    thread_local! {
        /// The instance created by the last successful `init` (a `P`), if any.
        static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
    }

    fn with_instance<P: DmPolicy, R>(
        call: &str,
        host: &mut dyn DmHost,
        uninitialized: R,
        f: impl FnOnce(&mut P, &mut dyn DmHost) -> R,
    ) -> R {
        INSTANCE.with(|slot| {
            let mut slot = slot.borrow_mut();
            match slot.as_mut().and_then(|b| b.downcast_mut::<P>()) {
                Some(p) => f(p, host),
                None => {
                    host.error(&format!(
                        "dm-policy plugin: `{call}` called before a successful `init`"
                    ));
                    uninitialized
                }
            }
        })
    }

    /// `init`: replaces the instance; a failed `init` leaves none.
    pub fn init<P: DmPolicy>(config: &str, host: &mut dyn DmHost) -> Result<(), String> {
        INSTANCE.with(|slot| slot.borrow_mut().take());
        let instance = P::init(config, host)?;
        INSTANCE.with(|slot| *slot.borrow_mut() = Some(Box::new(instance)));
        Ok(())
    }

    /// `on-event`; `abort(EIO)` before `init`.
    pub fn on_event<P: DmPolicy>(event: &Event, host: &mut dyn DmHost) -> Response {
        with_instance::<P, _>("on-event", host, Response::Abort(EIO), |p, h| {
            p.on_event(event, h)
        })
    }

    /// `on-notify`; dropped (with an error log) before `init`.
    pub fn on_notify<P: DmPolicy>(event: &Event, host: &mut dyn DmHost) {
        with_instance::<P, _>("on-notify", host, (), |p, h| p.on_notify(event, h))
    }

    /// `scan`; no decisions before `init`.
    pub fn scan<P: DmPolicy>(batch: &[FileStat], host: &mut dyn DmHost) -> Vec<ScanAction> {
        with_instance::<P, _>("scan", host, Vec::new(), |p, h| p.scan(batch, h))
    }
}

/// Export a [`DmPolicy`](crate::dm::DmPolicy) implementation as the component's `dm-policy`
/// world. Use once, at the crate root:
///
/// ```ignore
/// strata_plugin_sdk::export_dm_policy!(MyPolicy);
/// ```
///
/// The exports are only emitted when compiling for `wasm32`; native builds just check that the
/// type implements the trait.
#[macro_export]
macro_rules! export_dm_policy {
    ($ty:ty) => {
        const _: fn() = || {
            fn implements_dm_policy<T: $crate::dm::DmPolicy>() {}
            implements_dm_policy::<$ty>();
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __StrataDmPolicyGuest;

            impl $crate::dm::bindings::Guest for __StrataDmPolicyGuest {
                fn init(
                    config: ::std::string::String,
                ) -> ::core::result::Result<(), ::std::string::String> {
                    $crate::dm::__private::init::<$ty>(&config, &mut $crate::dm::WitHost)
                }

                fn on_event(event: $crate::dm::Event) -> $crate::dm::Response {
                    $crate::dm::__private::on_event::<$ty>(&event, &mut $crate::dm::WitHost)
                }

                fn on_notify(event: $crate::dm::Event) {
                    $crate::dm::__private::on_notify::<$ty>(&event, &mut $crate::dm::WitHost)
                }

                fn scan(
                    batch: ::std::vec::Vec<$crate::dm::FileStat>,
                ) -> ::std::vec::Vec<$crate::dm::ScanAction> {
                    $crate::dm::__private::scan::<$ty>(&batch, &mut $crate::dm::WitHost)
                }
            }

            $crate::dm::bindings::__export_dm_policy_world!(
                __StrataDmPolicyGuest with_types_in $crate::dm::bindings
            );
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::MemHost;

    struct Recorder {
        events: u32,
    }

    impl DmPolicy for Recorder {
        fn init(config: &str, _host: &mut dyn DmHost) -> Result<Self, String> {
            match config {
                "" => Ok(Recorder { events: 0 }),
                other => Err(format!("bad config {other}")),
            }
        }

        fn on_event(&mut self, _event: &Event, _host: &mut dyn DmHost) -> Response {
            self.events += 1;
            Response::Continue
        }

        fn scan(&mut self, batch: &[FileStat], _host: &mut dyn DmHost) -> Vec<ScanAction> {
            batch
                .iter()
                .map(|f| ScanAction {
                    handle: f.handle.clone(),
                    action: Action::Ignore,
                })
                .collect()
        }
    }

    fn event() -> Event {
        Event {
            kind: EventType::Read,
            token: 7,
            sequence: 1,
            session: 1,
            data: EventData::Data(DataEvent {
                handle: b"h".to_vec(),
                offset: 0,
                length: 1,
            }),
        }
    }

    #[test]
    fn calls_before_init_abort_with_eio() {
        let host = &mut MemHost::new();
        assert_eq!(
            __private::on_event::<Recorder>(&event(), host),
            Response::Abort(EIO)
        );
        __private::on_notify::<Recorder>(&event(), host);
        let stat = host.add_file(b"h", vec![1, 2, 3]).stat.clone();
        assert!(__private::scan::<Recorder>(&[stat], host).is_empty());
        assert_eq!(host.env.logs().len(), 3);
    }

    #[test]
    fn forwards_after_init() {
        let host = &mut MemHost::new();
        assert!(__private::init::<Recorder>("x", host).is_err());
        __private::init::<Recorder>("", host).unwrap();
        assert_eq!(
            __private::on_event::<Recorder>(&event(), host),
            Response::Continue
        );
        __private::on_notify::<Recorder>(&event(), host);
        let stat = host.add_file(b"h", vec![]).stat.clone();
        let actions = __private::scan::<Recorder>(&[stat], host);
        assert_eq!(actions.len(), 1);
        assert_eq!(actions[0].action, Action::Ignore);
    }

    #[test]
    fn event_type_names() {
        assert_eq!(EventType::Read.name(), "read");
        assert_eq!(EventType::Postsymlink.name(), "postsymlink");
    }

    #[test]
    fn bad_attr_name_is_einval() {
        let err: DmError = crate::attr_name("").unwrap_err().into();
        assert_eq!(err, DmError::Einval);
    }
}
