"""Just enough ELF to answer: which of these symbols does a file export?

Reads the section headers, then ``.dynsym`` and ``.dynstr`` only, so a 100 MB
binary like ``node`` costs a few MB of reads.  64-bit little-endian only
(x86_64/aarch64); anything else answers "no symbols".
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_SHDR = struct.Struct("<IIQQQQIIQQ")
_SYM = struct.Struct("<IBBHQQ")
SHT_DYNSYM = 11
SHN_UNDEF = 0
STT_FUNC = 2
STT_GNU_IFUNC = 10


def exported_symbols(path: str, wanted: Iterable[str]) -> set[str]:
    """The subset of ``wanted`` defined (not just imported) as functions in ``path``'s dynsym."""
    wanted_b = {w.encode() for w in wanted}
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            ehdr = f.read(_EHDR.size)
            if len(ehdr) < _EHDR.size or ehdr[:4] != b"\x7fELF" or ehdr[4] != 2 or ehdr[5] != 1:
                return set()
            (_, _, _, _, _, _, shoff, _, _, _, _, shentsize, shnum, _) = _EHDR.unpack(ehdr)
            if not shoff or shentsize != _SHDR.size or shnum == 0 or shnum > 4096 \
                    or shoff + shentsize * shnum > file_size:
                return set()
            f.seek(shoff)
            table = f.read(shentsize * shnum)
            sections = [_SHDR.unpack_from(table, i * shentsize) for i in range(len(table) // shentsize)]
            for _, sh_type, _, _, off, size, link, _, _, entsize in sections:
                if sh_type != SHT_DYNSYM or link >= len(sections) or entsize != _SYM.size:
                    continue
                stroff, strsize = sections[link][4], sections[link][5]
                if stroff + strsize > file_size or off + size > file_size:
                    return set()  # offsets past the file's end: a damaged or crafted file
                f.seek(stroff)
                strtab = f.read(strsize)
                # Cheap reject before walking the symbol table.
                if not any(b"\0" + w + b"\0" in strtab for w in wanted_b):
                    return set()
                f.seek(off)
                symtab = f.read(size)
                found = set()
                for i in range(len(symtab) // _SYM.size):
                    name_off, info, _, shndx, _, _ = _SYM.unpack_from(symtab, i * _SYM.size)
                    if shndx == SHN_UNDEF or (info & 0xF) not in (STT_FUNC, STT_GNU_IFUNC):
                        continue
                    end = strtab.find(b"\0", name_off)
                    name = strtab[name_off:end]
                    if name in wanted_b:
                        found.add(name.decode())
                return found
    except (OSError, ValueError, OverflowError, struct.error):  # unreadable, or not what it claims
        return set()
    return set()
