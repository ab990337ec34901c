"""Reading input sequences: every value checked, every refusal one line naming the place."""

import re
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rnnjax.app.inputs import FLOAT32_MAX, FLOAT32_TINY, parse_number, read_sequence
from rnnjax.core.checks import InputError


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    return path


@pytest.mark.parametrize("name, content, expected", [
    ("row.csv", "3,-5,7,-2\n", [3, -5, 7, -2]),
    ("column.csv", "3\n-5\n7\n-2", [3, -5, 7, -2]),
    ("spaces.csv", " 3 , -5,7 ,-2 \r\n\r\n", [3, -5, 7, -2]),
    ("bom.csv", "\ufeff3,-5,7,-2\r\n", [3, -5, 7, -2]),  # as spreadsheets write it
    ("row.txt", "3 -5\t7   -2", [3, -5, 7, -2]),
    ("column.txt", "\n3\n\n-5\n7\n-2\n\n", [3, -5, 7, -2]),
    ("forms.txt", "+1 1. .5 -2.5e-3 1E+2 0", [1, 1, 0.5, -2.5e-3, 100, 0]),
    ("zeros.txt", "0e-400 -0.000 1.2e-38", [0, 0, 1.2e-38]),
    ("printed.txt", "3.4028235e38", [3.4028235e38]),  # float32's largest as NumPy prints it
    ("largest.txt", f"{FLOAT32_MAX!r} -3.4e38", [FLOAT32_MAX, -3.4e38]),
])
def test_text_files_that_hold_one_sequence_are_read(tmp_path, name, content, expected):
    np.testing.assert_array_equal(read_sequence(write(tmp_path, name, content)), expected)


@pytest.mark.parametrize("name, content, match", [
    ("gap.csv", "3,,5\n", r"gap.csv: line 1, column 3: empty field; expected a number between the commas$"),
    ("trailing.csv", "3,5,\n", r"line 1, column 5: empty field"),
    ("table.csv", "3,-5\n7,-2\n", r"table.csv: line 1: 2 numbers on one line of a 2-line file; expected one "
                                  r"sequence: all on one line, or one number per line$"),
    ("ragged.txt", "1\n2 3\n", r"line 2: 2 numbers on one line of a 2-line file"),
    ("underscore.csv", "1_000\n", r"line 1, column 1: '1_000' is not a number$"),
    ("hex.txt", "1 0x10", r"line 1, column 3: '0x10' is not a number$"),
    ("nan.txt", "1\n nan", r"line 2, column 2: 'nan' is not a finite number$"),
    ("inf.csv", "1,-Infinity", r"line 1, column 3: '-Infinity' is not a finite number$"),
    ("big.txt", "1e39", r"line 1, column 1: 1e39 is beyond float32's range \(largest magnitude 3.403e\+38\)$"),
    ("huge.txt", "2 -1e400", r"line 1, column 3: -1e400 is beyond float32's range"),
    ("tiny.csv", "1e-45,1e-40", r"line 1, column 1: 1e-45 is below float32's range \(smallest normal magnitude "
                                r"1.175e-38, where it would be read as 0\); write 0, or scale the sequence$"),
    ("underflow.txt", "3\n-1e-400", r"line 2, column 1: -1e-400 is below float32's range"),
    ("digits.csv", "9" * 5000, r"line 1, column 1: 9{24}\.\.\. is beyond float32's range \(largest magnitude 3.403e\+38\)$"),
    ("zeros.csv", "0." + "0" * 5000 + "1", r"line 1, column 1: 0\.0{22}\.\.\. is below float32's range"),
    ("word.csv", "1,2\n", None),
    ("semicolon.csv", "1;2", r"line 1, column 1: '1;2' is not a number$"),
    ("comma.txt", "1, 2", r"line 1, column 1: '1,' is not a number$"),
    ("arabic.txt", "\u0663", r"line 1, column 1: '\u0663' is not a number$"),
    ("long.txt", "x" * 100, r"'xxxxxxxxxxxxxxxxxxxxxxxx\.\.\.' is not a number$"),
    ("empty.txt", "", r"empty.txt: holds no numbers$"),
    ("bom-only.csv", "\ufeff\n \n", r"holds no numbers$"),
    ("latin1.txt", b"1 \xe9", r"latin1.txt: not UTF-8 text \(byte 0xe9 at offset 2\)$"),
    ("seq.json", "[1]", r"seq.json: expected a .npy, .csv or .txt file; received '.json'$"),
    ("noext", "1", r"noext: expected a .npy, .csv or .txt file; received 'noext'$"),
])
def test_bad_text_is_refused_naming_line_and_column(tmp_path, name, content, match):
    path = write(tmp_path, name, content.replace("1,2", "1,two") if name == "word.csv" else content)
    with pytest.raises(InputError, match=match or r"word.csv: line 1, column 3: 'two' is not a number$") as info:
        read_sequence(path)
    assert info.value.name == "path" and str(info.value).startswith(f"{path}: ")


@pytest.mark.parametrize("content, match", [
    ("0,1,1,0", None),
    ("0,2,1", r"line 1, column 3: 2 is not 0 or 1 \(the count network reads bits\)$"),
    ("1\n0.5", r"line 2, column 1: 0.5 is not 0 or 1"),
    ("1.0 0e5 -0", None),
])
def test_bits_must_be_zero_or_one(tmp_path, content, match):
    path = write(tmp_path, "bits.txt" if " " in content else "bits.csv", content)
    if match is None:
        assert set(read_sequence(path, bits=True)) <= {0.0, 1.0}
    else:
        with pytest.raises(InputError, match=match):
            read_sequence(path, bits=True)


def npy(tmp_path, array, name="x.npy"):
    path = tmp_path / name
    np.save(path, array)
    return path


def test_npy_arrays_of_one_sequence_are_read(tmp_path):
    np.testing.assert_array_equal(read_sequence(npy(tmp_path, np.arange(4.0).reshape(4, 1))), np.arange(4.0))
    np.testing.assert_array_equal(read_sequence(npy(tmp_path, np.arange(3, dtype=np.int8)[None])), [0, 1, 2])
    np.testing.assert_array_equal(read_sequence(npy(tmp_path, np.array([True, False])), bits=True), [1, 0])
    np.testing.assert_array_equal(read_sequence(npy(tmp_path, np.float16([0.5]))), [0.5])


def test_bad_npy_files_are_refused_in_our_own_words(tmp_path):
    cases = [
        (np.ones((2, 3)), r"x.npy: expected one sequence; received an array of shape \(2, 3\)$"),
        (np.array([1.0, 1e39, np.nan]), r"x.npy: index 1: 1e\+39 is beyond float32's range; expected finite "
                                        r"numbers within float32's range, 0 or 1.175e-38 to 3.403e\+38 in "
                                        r"magnitude \(2 such values\)$"),
        (np.array([0.0, -1e-40, 1e-39, 1.0]), r"x.npy: index 1: -1e-40 is below float32's range; .*\(2 such values\)$"),
        (np.array([1.0, np.longdouble("1e-4000")]), r"x.npy: index 1: 1e-4000 is below float32's range"),
        (np.array([0.0, np.nan]), r"index 1: NaN"),
        (np.array([1 + 2j]), r"expected real numbers; received dtype complex128$"),
        (np.array(["a"]), r"expected real numbers; received dtype <U1$"),
        (np.array([1, "a"], dtype=object), r"holds Python objects \(dtype object\); expected an array of numbers$"),
        (np.zeros(0), r"x.npy: holds no numbers$"),
    ]
    for array, match in cases:
        path = tmp_path / "x.npy"
        np.save(path, array, allow_pickle=True)
        with pytest.raises(InputError, match=match):
            read_sequence(path)
    with pytest.raises(InputError, match=r"index 2: 2 is not 0 or 1"):
        read_sequence(npy(tmp_path, np.array([0, 1, 2])), bits=True)
    path = npy(tmp_path, np.arange(100.0))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(InputError, match=r"x.npy: cut short: its header promises 800 bytes of data; it holds 792$"):
        read_sequence(path)
    for content, match in [
        (np.random.default_rng(0).bytes(200), r"not a .npy file \(it does not start with the .npy signature\)$"),
        (b"\x93NUMPY\x01\x00garbage", r"damaged .npy header"),
        (b"", r"not a .npy file"),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (4,"), r"damaged .npy header \(.*EOF"),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (True,), }"),
         r"damaged .npy header \(shape \(True,\); expected non-negative integers\)$"),
        (_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1,), }"),
         r"damaged .npy header \(shape \(-1,\); expected non-negative integers\)$"),
    ]:
        with pytest.raises(InputError, match=match) as info:
            read_sequence(write(tmp_path, "r.npy", content))
        assert "allow_pickle" not in str(info.value)
    with open(tmp_path / "a.npy", "wb") as f:
        np.savez(f, a=np.ones(3))
    with pytest.raises(InputError, match=r"holds an .npz archive; expected one array \(np.save\)$"):
        read_sequence(tmp_path / "a.npy")


def test_a_python_2_header_is_read_without_a_warning(tmp_path):
    path = write(tmp_path, "old.npy", _header("{'descr': '<f8', 'fortran_order': False, 'shape': (2L,), }")[:-16]
                 + np.array([3.0, -5.0]).tobytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(read_sequence(path), [3.0, -5.0])
    assert not caught, [str(w.message) for w in caught]


def _header(text):
    """A version-1.0 .npy whose header dictionary is ``text``, followed by 16 zero bytes."""
    header = text.encode("latin1")
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\x00" * 16


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(InputError, match=r"missing.csv: no such file$"):
        read_sequence(tmp_path / "missing.csv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(InputError, match=r"folder.csv: is a folder; expected a file$"):
        read_sequence(tmp_path / "folder.csv")


def test_parse_number():
    assert parse_number("-2.5e3") == -2500.0 and parse_number("+.5") == 0.5
    for text in ("1_0", " 1", "1 ", "", "e5", "1e", "--1", "0x1", "١", "NaN", "inf"):
        with pytest.raises(InputError, match=rf"^{re.escape(repr(text))} is not a (finite )?number$"):
            parse_number(text)
    with pytest.raises(InputError, match=r"^1e39 is beyond float32's range \(largest magnitude 3.403e\+38\)$"):
        parse_number("1e39")


# Property tests: any file either reads as finite float32-range numbers or is refused with one
# InputError line naming the file; nothing else escapes. The examples drawn come from the
# hypothesis profile (tests/conftest.py).

TEXT = st.text(alphabet=st.sampled_from(list("0123456789+-.eE_, \t\r\n;xabn\ufeff\u00a0\u2028\x00")), max_size=60)


def check_read(path, bits):
    try:
        values = read_sequence(path, bits=bits)
    except InputError as e:
        message = str(e)
        assert message.startswith(f"{path}: ") and "\n" not in message and "\r" not in message, message
        assert e.name == "path"
        return None
    assert values.ndim == 1 and values.size > 0 and values.dtype == np.float64
    assert np.all(np.isfinite(values.astype(np.float32)) & ((np.abs(values) >= FLOAT32_TINY) | (values == 0)))
    if bits:
        assert set(values) <= {0.0, 1.0}
    return values


@given(text=TEXT, suffix=st.sampled_from([".csv", ".txt"]), bits=st.booleans())
def test_any_text_reads_or_is_refused_in_one_line(tmp_path, text, suffix, bits):
    path = tmp_path / f"seq{suffix}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    values = check_read(path, bits)
    if values is not None:  # what was read is what the file spells, number for number
        separators = r"[,\s]+" if suffix == ".csv" else r"[ \t\r\n]+"
        tokens = [t for t in re.split(separators, text.lstrip("\ufeff")) if t]
        np.testing.assert_array_equal(values, [float(t) for t in tokens])


@given(content=st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=200).map(lambda b: b"\x93NUMPY" + b),
    st.tuples(st.sampled_from(["<f8", "<f4", "<i8", "|u1", "|b1", "<c8", "<U2", ">f8", "<f2"]),
              st.lists(st.integers(0, 5), max_size=3), st.integers(-40, 40)).map(
        lambda spec: _npy_bytes(*spec)),
    st.lists(st.tuples(st.integers(8, 79), st.integers(0, 255)), min_size=1, max_size=4).map(
        lambda edits: _edited(_npy_bytes("<f4", [4], 0), edits)),  # a damaged header
), bits=st.booleans())
def test_any_npy_bytes_read_or_are_refused_in_one_line(tmp_path, content, bits):
    path = tmp_path / "seq.npy"
    path.write_bytes(content)
    check_read(path, bits)


def _edited(data, edits):
    data = bytearray(data)
    for index, byte in edits:
        data[index] = byte
    return bytes(data)


def _npy_bytes(dtype, shape, cut):
    """A .npy of ``shape`` and ``dtype`` filled with large and odd values, cut or padded by ``cut``
    bytes at the end."""
    import io

    values = np.resize(np.array([0, 1, 3e38, -5e38, np.nan, np.inf, 2.5]), shape)
    with np.errstate(all="ignore"):
        array = values.astype(dtype) if np.dtype(dtype).kind != "U" else values.astype(str).astype(dtype)
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    return data[:cut] if cut < 0 else data + b"\x00" * cut
