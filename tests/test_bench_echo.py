"""The echo benchmark's turn order: a fair rotation between the clients it compares."""

from bench.echo import turn_order

KINDS = ["3compute", "ttyd", "terminado", "raw"]


def test_each_round_gives_every_client_one_keystroke():
    for keystroke in range(12):
        assert sorted(turn_order(KINDS, keystroke)) == sorted(KINDS)


def test_every_client_goes_first_in_turn():
    assert [turn_order(KINDS, keystroke)[0] for keystroke in range(8)] == KINDS * 2
