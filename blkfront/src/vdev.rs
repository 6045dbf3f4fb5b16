//! Virtual-device names (`xvda`, `sdb`, `51712`) to device ids (pv-protocols.md §1.4).

/// The device id of `name`: a decimal number as is, or `xvdX`/`sdX` (X: `a`..`z`, `aa`.., with
/// an optional partition number). `None` if it is neither.
pub fn devid(name: &str) -> Option<u32> {
    if let Ok(n) = name.parse::<u32>() {
        return Some(n);
    }
    let (major, rest) = if let Some(r) = name.strip_prefix("xvd") {
        (202u32, r)
    } else if let Some(r) = name.strip_prefix("sd") {
        (8u32, r)
    } else {
        return None;
    };
    let letters: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase())
        .collect();
    let part_s = &rest[letters.len()..];
    if letters.is_empty() || letters.len() > 3 {
        return None;
    }
    let mut disk: u32 = 0;
    for c in letters.chars() {
        disk = disk * 26 + (c as u32 - 'a' as u32 + 1);
    }
    disk -= 1;
    let part: u32 = if part_s.is_empty() {
        0
    } else {
        part_s.parse().ok()?
    };
    if major == 202 && disk < 16 && part < 16 {
        Some((202 << 8) | (disk << 4) | part)
    } else if major == 8 && disk < 16 && part < 16 {
        Some((8 << 8) | (disk << 4) | part)
    } else if disk < (1 << 20) && part < 256 {
        Some((1 << 28) | (disk << 8) | part)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(super::devid("xvda"), Some(51712));
        assert_eq!(super::devid("xvdb"), Some(51728));
        assert_eq!(super::devid("51712"), Some(51712));
        assert_eq!(super::devid("xvdq"), Some((1 << 28) | (16 << 8)));
        assert_eq!(super::devid("eth0"), None);
    }
}
