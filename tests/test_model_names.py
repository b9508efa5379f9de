"""delrec.core.names: a run's model names split once, and given back whole."""

import pytest

from delrec.core.names import ModelName

TEACHERS = ("sasrec", "gru4rec")


@pytest.mark.parametrize("name, teacher, method", [
    ("sasrec-delrec", "sasrec", "delrec"),
    ("sasrec-wo-sp", "sasrec", "wo-sp"),  # the method keeps its own dashes
    ("gru4rec-teacher-list", "gru4rec", "teacher-list"),
    ("sasrec", "sasrec", ""),
    ("popularity", "popularity", ""),
    ("random", "random", ""),
    ("zero-shot", "zero-shot", ""),  # not a method `shot` of a teacher `zero`
    ("caser-delrec", "caser-delrec", ""),  # caser is not a teacher of this run
])
def test_names_of_a_run(name, teacher, method):
    model = ModelName.parse(name, TEACHERS)
    assert (model.teacher, model.method) == (teacher, method)
    assert model.bare == (method == "")
    assert str(model) == name


def test_without_teachers_the_split_is_textual():
    assert ModelName.parse("zero-shot") == ModelName("zero", "shot")
    assert ModelName.parse("caser-delrec") == ModelName("caser", "delrec")
    assert ModelName.parse("sasrec") == ModelName("sasrec") and ModelName.parse("sasrec").bare
    assert str(ModelName("sasrec", "wo-sp")) == "sasrec-wo-sp"
