//! The tc plumbing between a veth and its tap: an `ingress` qdisc on each, and on each a u32
//! match-all filter whose action is `mirred egress redirect` to the other device, i.e.
//!
//! ```text
//! tc qdisc add dev eth0 ingress
//! tc filter add dev eth0 parent ffff: protocol all u32 match u8 0 0 action mirred egress redirect dev tap0_capsa
//! (and the same from tap0_capsa to eth0)
//! ```
//!
//! The mirred action carries a cookie ([`CAPSA_COOKIE`]) so that a cleanup that has nothing but the
//! namespace path can tell capsa's filters from anybody else's.

use futures_util::TryStreamExt;
use rtnetlink::packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirrorOption, TcActionOption,
    TcActionType, TcAttribute, TcFilterU32Option, TcHandle, TcMessage, TcMirror,
    TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use tracing::debug;

use super::netns::NetlinkHandle;
use super::NetworkError;

/// `ETH_P_ALL`: the filter sees every protocol. The kernel reads the filter protocol (the low 16 bits
/// of `tcm_info`) in network byte order, as `tc` sends `htons(ETH_P_ALL)`; host order would be read
/// as protocol 0x0300 and match nothing.
const ETH_P_ALL_BE: u16 = (libc::ETH_P_ALL as u16).to_be();
/// The ingress qdisc's handle, `ffff:`; its filters hang off parent `ffff:0`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// Filter priority (`pref`) of capsa's redirect.
const FILTER_PRIORITY: u16 = 49152;
/// Opaque cookie on capsa's mirred actions (the kernel stores it and returns it in dumps).
pub const CAPSA_COOKIE: &[u8] = b"capsa-tcfilter";

/// Errno of a netlink NACK.
pub(crate) fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Adds an ingress qdisc (`ffff:`) on `ifindex`; fails with EEXIST if it already has one.
pub async fn add_ingress_qdisc(
    handle: &NetlinkHandle,
    ifindex: u32,
    ifname: &str,
) -> Result<(), NetworkError> {
    handle
        .qdisc()
        .add(ifindex as i32)
        .ingress()
        .execute()
        .await
        .map_err(|source| {
            if errno(&source) == Some(libc::EEXIST) {
                NetworkError::IngressQdiscExists {
                    interface: ifname.to_string(),
                }
            } else {
                NetworkError::Netlink {
                    request: "RTM_NEWQDISC ingress",
                    interface: ifname.to_string(),
                    source,
                }
            }
        })?;
    debug!(interface = ifname, "added ingress qdisc");
    Ok(())
}

/// Deletes the ingress qdisc of `ifindex` (and with it every filter under it). Returns false when
/// there was none (or the device is gone).
pub async fn del_ingress_qdisc(
    handle: &NetlinkHandle,
    ifindex: u32,
    ifname: &str,
) -> Result<bool, NetworkError> {
    let mut req = handle.qdisc().del(ifindex as i32);
    req.message_mut().header.parent = TcHandle::INGRESS;
    req.message_mut().header.handle = TcHandle::from(INGRESS_HANDLE);
    match req.execute().await {
        Ok(()) => {
            debug!(interface = ifname, "deleted ingress qdisc");
            Ok(true)
        }
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(false)
        }
        Err(source) => Err(NetworkError::Netlink {
            request: "RTM_DELQDISC ingress",
            interface: ifname.to_string(),
            source,
        }),
    }
}

/// Adds the match-all filter on `from`'s ingress that redirects every frame to `to`'s egress.
pub async fn add_redirect(
    handle: &NetlinkHandle,
    from: (u32, &str),
    to: (u32, &str),
) -> Result<(), NetworkError> {
    // A single key `match u8 0 0 at 0`: matches every packet.
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to.0;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind("mirred".to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
        TcActionAttribute::Cookie(CAPSA_COOKIE.to_vec()),
    ];
    let options = [
        TcFilterU32Option::Selector(selector),
        TcFilterU32Option::Action(vec![action]),
    ];
    let err = |source| NetworkError::Netlink {
        request: "RTM_NEWTFILTER u32 mirred redirect",
        interface: from.1.to_string(),
        source,
    };
    handle
        .traffic_filter(from.0 as i32)
        .add()
        .parent(INGRESS_HANDLE)
        .priority(FILTER_PRIORITY)
        .protocol(ETH_P_ALL_BE)
        .u32(&options)
        .map_err(err)?
        .execute()
        .await
        .map_err(err)?;
    debug!(from = from.1, to = to.1, "added ingress redirect");
    Ok(())
}

/// Whether a filter message carries an action with capsa's cookie.
pub fn is_capsa_filter(msg: &TcMessage) -> bool {
    msg.attributes.iter().any(|a| match a {
        TcAttribute::Options(opts) => opts.iter().any(|o| match o {
            TcOption::U32(TcFilterU32Option::Action(actions)) => actions.iter().any(|act| {
                act.attributes
                    .iter()
                    .any(|aa| matches!(aa, TcActionAttribute::Cookie(c) if c == CAPSA_COOKIE))
            }),
            _ => false,
        }),
        _ => false,
    })
}

/// The filters on the ingress of `ifindex` (empty if it has no ingress qdisc).
pub async fn ingress_filters(
    handle: &NetlinkHandle,
    ifindex: u32,
    ifname: &str,
) -> Result<Vec<TcMessage>, NetworkError> {
    match handle
        .traffic_filter(ifindex as i32)
        .get()
        .ingress()
        .execute()
        .try_collect::<Vec<_>>()
        .await
    {
        Ok(v) => Ok(v),
        Err(e)
            if matches!(
                errno(&e),
                Some(libc::ENOENT) | Some(libc::EINVAL) | Some(libc::ENODEV)
            ) =>
        {
            Ok(Vec::new())
        }
        Err(source) => Err(NetworkError::Netlink {
            request: "RTM_GETTFILTER dump",
            interface: ifname.to_string(),
            source,
        }),
    }
}
