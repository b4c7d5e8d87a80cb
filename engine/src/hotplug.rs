//! Device hotplug: plugging disks and NICs into a domain and out of it, live and in its
//! definition (`virDomainAttachDeviceFlags`, `virDomainDetachDeviceFlags`).
//!
//! Plugging in is immediate. Plugging out of a running guest needs the guest's
//! acknowledgement (ACPI for PCI devices; USB devices leave at once): libvirt drops the
//! device from the definition, asks QEMU to unplug it and waits up to 5 s itself;
//! [`Engine::domain_detach_device`] then waits up to its deadline for the device to leave the
//! running domain. A guest that does not let go (no OS, no driver, hung) gets
//! [`DetachOutcome::Refused`], and the device is noted in the live domain's metadata
//! ([`crate::model::device`]) so that nobody asks again before the guest restarts.

use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use crate::domain::raw_state;
use crate::engine::{CallClass, Engine};
use crate::error::{Result, lv};
use crate::model::device::{PENDING_NS, PENDING_PREFIX, pending_element, pending_from_metadata};
use crate::model::{Device, DeviceKey, Owner, xml};

/// How an unplug ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DetachOutcome {
    /// The device is gone from the definition and, when the domain runs, from the guest.
    Removed,
    /// The domain has no such device (nothing was asked).
    NotPresent,
    /// The device is gone from the definition, but the running guest did not release it
    /// within the deadline: it stays plugged in until the guest lets go or stops.
    Refused {
        /// How long the engine waited for the guest.
        waited: Duration,
    },
}

/// libvirt flags for a device change: the running domain when active, the definition when
/// persistent.
fn device_flags(active: bool, persistent: bool) -> u32 {
    let mut flags = 0;
    if active {
        flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
    }
    if persistent {
        flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
    }
    flags
}

fn active_and_persistent(dom: &Domain, call: &'static str) -> Result<(bool, bool)> {
    Ok((
        raw_state(dom, call)?.0.is_active(),
        dom.is_persistent().map_err(lv(call))?,
    ))
}

/// The keys of the live unplug note.
fn pending_keys(dom: &Domain) -> Vec<String> {
    // Read from the live XML: `virDomainGetMetadata` fails when the note is absent.
    dom.xml_desc(0)
        .ok()
        .and_then(|text| xml::parse(&text).ok())
        .and_then(|root| root.find("metadata").map(pending_from_metadata))
        .unwrap_or_default()
}

/// Rewrites the live unplug note with `keys` (removes it when empty).
fn write_pending(dom: &Domain, keys: &[String], call: &'static str) -> Result<()> {
    let note = pending_element(keys);
    dom.set_metadata(
        sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
        note.as_deref(),
        note.as_ref().map(|_| PENDING_PREFIX),
        Some(PENDING_NS),
        sys::VIR_DOMAIN_AFFECT_LIVE,
    )
    .map_err(lv(call))
}

impl Engine {
    /// Plugs a device into a domain: into the running guest when active and into the
    /// definition when persistent (a stopped domain only gets the definition changed). An
    /// unplug of the same device still noted as pending is forgotten.
    pub async fn domain_attach_device(
        &self,
        name: &str,
        owner: &Owner,
        device: &Device,
    ) -> Result<()> {
        let (device_xml, key) = (device.to_xml(), device.key().map(|k| k.as_key()));
        self.owned::<Domain, _, _>(
            CallClass::Mutate,
            "domain_attach_device",
            name,
            owner,
            move |dom| {
                const CALL: &str = "domain_attach_device";
                let (active, persistent) = active_and_persistent(dom, CALL)?;
                dom.attach_device_flags(&device_xml, device_flags(active, persistent))
                    .map_err(lv(CALL))?;
                if active && let Some(key) = &key {
                    let mut keys = pending_keys(dom);
                    if keys.contains(key) {
                        keys.retain(|k| k != key);
                        write_pending(dom, &keys, CALL)?;
                    }
                }
                Ok(())
            },
        )
        .await
    }

    /// Unplugs a device from a domain's definition and, when it runs, from the guest,
    /// waiting up to `deadline` (counted from the call) for the guest to release it. See
    /// [`DetachOutcome`]; a refused unplug is noted in the live domain's metadata.
    pub async fn domain_detach_device(
        &self,
        name: &str,
        owner: &Owner,
        key: &DeviceKey,
        deadline: Duration,
    ) -> Result<DetachOutcome> {
        let start = Instant::now();
        let k = key.clone();
        let asked = self
            .owned::<Domain, _, _>(
                CallClass::Mutate,
                "domain_detach_device",
                name,
                owner,
                move |dom| {
                    const CALL: &str = "domain_detach_device";
                    let (active, persistent) = active_and_persistent(dom, CALL)?;
                    let live = xml::parse(&dom.xml_desc(0).map_err(lv(CALL))?)?;
                    let config = if persistent && active {
                        Some(xml::parse(
                            &dom.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
                                .map_err(lv(CALL))?,
                        )?)
                    } else {
                        None
                    };
                    let in_live = k.find(&live).cloned();
                    // Inactive: the XML read is the definition.
                    let in_config = match &config {
                        Some(c) => k.find(c).is_some(),
                        None => persistent && in_live.is_some(),
                    };
                    let Some(element) = in_live
                        .clone()
                        .or_else(|| config.as_ref().and_then(|c| k.find(c)).cloned())
                    else {
                        return Ok(None);
                    };
                    let live_part = active && in_live.is_some();
                    let flags = device_flags(live_part, in_config);
                    if flags == 0 {
                        return Ok(None);
                    }
                    dom.detach_device_flags(&element.to_xml(), flags)
                        .map_err(lv(CALL))?;
                    Ok(Some(live_part))
                },
            )
            .await?;
        let wait_for_guest = match asked {
            None => return Ok(DetachOutcome::NotPresent),
            Some(live) => live,
        };
        if !wait_for_guest {
            return Ok(DetachOutcome::Removed);
        }
        let mut poll = Duration::from_millis(100);
        loop {
            let live = self.domain_xml(name, false).await?;
            if key.find(&xml::parse(&live)?).is_none() {
                return Ok(DetachOutcome::Removed);
            }
            let left = deadline.saturating_sub(start.elapsed());
            if left.is_zero() {
                break;
            }
            tokio::time::sleep(poll.min(left)).await;
            poll = (poll * 2).min(Duration::from_millis(500));
        }
        let key_text = key.as_key();
        let noted = self
            .owned::<Domain, _, _>(
                CallClass::Mutate,
                "domain_note_pending_unplug",
                name,
                owner,
                move |dom| {
                    const CALL: &str = "domain_note_pending_unplug";
                    // The guest stopped meanwhile: the device left with it.
                    if !raw_state(dom, CALL)?.0.is_active() {
                        return Ok(false);
                    }
                    let mut keys = pending_keys(dom);
                    if !keys.contains(&key_text) {
                        keys.push(key_text.clone());
                        write_pending(dom, &keys, CALL)?;
                    }
                    Ok(true)
                },
            )
            .await?;
        Ok(if noted {
            DetachOutcome::Refused {
                waited: start.elapsed(),
            }
        } else {
            DetachOutcome::Removed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_what_exists() {
        assert_eq!(
            device_flags(true, true),
            sys::VIR_DOMAIN_AFFECT_LIVE | sys::VIR_DOMAIN_AFFECT_CONFIG
        );
        assert_eq!(device_flags(false, true), sys::VIR_DOMAIN_AFFECT_CONFIG);
        assert_eq!(device_flags(true, false), sys::VIR_DOMAIN_AFFECT_LIVE);
        assert_eq!(device_flags(false, false), 0);
    }
}
