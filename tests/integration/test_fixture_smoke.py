def test_sshd_fixture_accepts_ansible(run_play):
    run = run_play(
        """
        - name: Ping
          ansible.builtin.ping:
          register: pong
        """
    )
    assert run.rc == 0, run
    assert run["pong"]["ping"] == "pong"
