"""ctredge.benchmarks"""
