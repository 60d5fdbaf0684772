import pytest

from crackio.writing.filenames import BadName, format_name, parse_name


def test_dotted_stem_parses_right_to_left():
    p = parse_name("IMG_0042_jpg.rf.9f8e7d.17.0_734.1.jpg")
    assert (p.stem, p.proposal, p.iou, p.label) == ("IMG_0042_jpg.rf.9f8e7d", 17, 0.734, 1)


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "JPG"])
def test_extensions(ext):
    assert parse_name(f"a.3.0_5.0.{ext}").iou == 0.5


def test_whole_number_iou():
    assert parse_name("a.0.1.1.jpg").iou == 1.0
    assert parse_name("a.0.0.0.jpg").iou == 0.0


def test_round_trip():
    name = format_name("IMG_7_jpg.rf.x", 12, 0.3456, 0)
    assert name == "IMG_7_jpg.rf.x.12.0_346.0.jpg"
    assert parse_name(name).iou == 0.346


@pytest.mark.parametrize(
    "name, why",
    [
        ("IMG_0001.jpg", "5 dot-separated parts"),
        ("a.1.0_5.1.heic", "extension"),
        ("a.x.0_5.1.jpg", "proposal number"),
        ("a.1.0_5.2.jpg", "label"),
        ("a.1.0.734.1.jpg", "outside"),  # IoU written with "." instead of "_"
        ("a.1.zero.1.jpg", "IoU"),
        ("a.1.1_5.1.jpg", "outside [0, 1]"),
        (".1.0_5.1.jpg", "empty stem"),
        ("a.\u0661\u0662.0_5.1.jpg", "ASCII digits"),  # Arabic-Indic digits: str.isdigit() says yes
        ("a.1.0_\u00b25.1.jpg", "ASCII digits"),  # a superscript two
        ("caf\udce9.1.0_5.1.jpg", "not valid UTF-8"),  # the Latin-1 byte 0xE9 as read from disk
    ],
)
def test_bad_names_say_why(name, why):
    with pytest.raises(BadName, match=why.replace("[", r"\[").replace("]", r"\]")):
        parse_name(name)
