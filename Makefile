# The two commands of a fresh clone (README, first section).
.PHONY: demo test

demo:  # set up .venv and train the small AFQMC recipe end to end
	bash run.sh

test:  # set up .venv with the test extras and run the suite, exactly as CI does
	bash .ci/run
