#!/usr/bin/env python3
"""Writes the uncompressed vmlinux ELF held in an x86 bzImage (Debian's are xz-compressed).
Xen builds dom0 from a plain ELF in ~0.2 s; from the bzImage it spends 7-10 s in xz under TCG.
usage: vmlinux.py BZIMAGE OUT"""
import lzma
import sys

data = open(sys.argv[1], "rb").read()
magic = b"\xfd7zXZ\x00"
at = data.find(magic)
while at >= 0:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[at:])
    except lzma.LZMAError:
        out = b""
    if out[:4] == b"\x7fELF":
        with open(sys.argv[2], "wb") as f:
            f.write(out)
        sys.exit(0)
    at = data.find(magic, at + 1)
sys.exit("vmlinux.py: no xz-compressed ELF in " + sys.argv[1])
