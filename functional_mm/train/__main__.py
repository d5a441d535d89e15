from functional_mm.train.main import run

run()
