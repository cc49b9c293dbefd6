"""gmmrefine.simulate"""
