"""Hardware-in-the-loop rig: scenarios, runner, report, and the simulated peers shared with the tests."""
