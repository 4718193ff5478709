"""The block formats have one source, ``kernels/formats.py``: the header each build generates from
it is the table the C++ kernels index, and no C++ file spells the list itself. No compiling."""

import re

from dovetail import kernels
from dovetail.kernels import SOURCE_DIR, build_id, formats
from dovetail.kernels.formats import SCHEMES, Mode, c_header


def _parse(header: str) -> tuple[dict[str, int], list[tuple[int, int, str]]]:
    enum = re.search(r"enum Mode \{([^}]*)\}", header).group(1)
    modes = {name.strip(): int(value) for name, value in (item.split("=") for item in enum.split(","))}
    table = header[header.index("#define DOVETAIL_FORMATS(X)"):]
    columns = [(int(b), int(g), m) for b, g, m in re.findall(r"X\((\d+), (\d+), (\w+)\)", table)]
    return modes, columns


def test_the_generated_header_is_the_python_table():
    modes, columns = _parse(c_header())
    assert modes == {m.name: m.value for m in Mode}
    # one column per (bits, group, mode), in SCHEMES' order: a format's column is its kernel
    expected = list(dict.fromkeys((s.bits, s.group, s.mode.name) for s in SCHEMES.values()))
    assert columns == expected and len(columns) == len(SCHEMES)  # no two formats share a column


def test_no_source_file_spells_the_formats():
    for path in SOURCE_DIR.rglob("*"):
        if path.suffix in (".cpp", ".h"):
            text = path.read_text()
            assert not re.search(r"#define\s+DOVETAIL_FORMATS|enum\s+Mode\s*\{", text), path
    assert '#include "formats.h"' in (SOURCE_DIR / "kernels.h").read_text()
    assert kernels.FORMATS_HEADER == "formats.h"


def test_a_changed_table_is_a_new_build(monkeypatch):
    before = build_id()
    fewer = dict(list(SCHEMES.items())[:-1])
    monkeypatch.setattr(formats, "SCHEMES", fewer)
    assert "Q2_K" not in c_header()
    assert build_id() != before
